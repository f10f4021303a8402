//! `pgcairn expire [--dry-run]`: compute the retention plan for a server,
//! print it (which backups and WAL go, why, what stays), and unless
//! `--dry-run`, carry it out. Also home of the plan printing `delete` uses.

use std::io::IsTerminal;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use super::Ctx;
use crate::cli::{ExpireArgs, Format};
use crate::engine::retention::{self, Executed, Plan, Policy, Rules};
use crate::engine::{utc_stamp, Progress};
use crate::repo::format::now_unix;

/// The retention rules configured for `server` (`[server.NAME]`).
pub fn configured_rules(ctx: &Ctx, server: &str) -> Result<Rules> {
    let s = ctx.server_settings(server);
    let policy = s
        .retention_policy
        .as_deref()
        .map(|p| {
            p.parse::<Policy>()
                .map_err(|e| anyhow::anyhow!("[server.{server}] {e}"))
        })
        .transpose()?;
    Ok(Rules {
        policy,
        minimum_redundancy: s.minimum_redundancy.unwrap_or(0),
    })
}

/// Counts, not bytes: one step per removed name.
pub struct CountBar(Option<ProgressBar>);

impl CountBar {
    pub fn new() -> CountBar {
        CountBar(std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(0);
            b.set_style(
                ProgressStyle::with_template("{msg:16} [{bar:40}] {pos}/{len} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            b
        }))
    }
    pub fn finish(&self) {
        if let Some(b) = &self.0 {
            b.finish_and_clear();
        }
    }
}

impl Default for CountBar {
    fn default() -> Self {
        CountBar::new()
    }
}

impl Progress for CountBar {
    fn phase(&self, name: &str, total: u64) {
        if let Some(b) = &self.0 {
            b.set_message(name.to_string());
            b.set_length(total);
            b.set_position(0);
        }
    }
    fn advance(&self, n: u64) {
        if let Some(b) = &self.0 {
            b.inc(n);
        }
    }
}

#[derive(Serialize)]
struct Report<'a> {
    plan: &'a Plan,
    dry_run: bool,
    executed: Option<&'a Executed>,
}

fn file_of(manifest: &str) -> &str {
    manifest.rsplit('/').next().unwrap_or(manifest)
}

/// The plan for people.
pub fn print_plan(p: &Plan) -> Result<()> {
    outln!(
        "server {}: {}, minimum_redundancy {}",
        p.server,
        p.policy
            .as_deref()
            .map_or("no policy (delete)".to_string(), |s| format!("policy {s}")),
        p.minimum_redundancy
    );
    for b in &p.backups {
        let verb = if p.remove_backups.contains(&b.backup_id) {
            "REMOVE"
        } else {
            "keep  "
        };
        outln!(
            "  {verb} {}  ended {}  {:<25} {}",
            b.backup_id,
            utc_stamp(b.stop_time),
            b.status.to_string(),
            b.reason
        );
    }
    match &p.wal_cutoff {
        None => outln!("  WAL: no backup is retained by the policy; no WAL is removed"),
        Some(c) => {
            out!(
                "  WAL: keeping everything from {} (start of backup {}, the oldest retained) and what pinned backups need; ",
                c.segment, c.backup_id
            );
            match (p.remove_wal.first(), p.remove_wal.last()) {
                (Some(a), Some(z)) => outln!(
                    "removing {} file(s), {} .. {}; {} stay",
                    p.remove_wal.len(),
                    file_of(a),
                    file_of(z),
                    p.keep_wal
                ),
                _ => outln!("nothing to remove; {} file(s) stay", p.keep_wal),
            }
        }
    }
    Ok(())
}

/// Print, and unless `dry_run` execute, a plan. With `--format json` the
/// report is returned for the caller to print (alone, or with gc's).
pub async fn print_and_run(
    ctx: &Ctx,
    repo: &crate::repo::Repository,
    plan: &Plan,
    dry_run: bool,
) -> Result<Option<serde_json::Value>> {
    let json = ctx.global.format == Format::Json;
    if !json {
        print_plan(plan)?;
    }
    let executed = if dry_run {
        None
    } else {
        let bar = CountBar::new();
        let r = retention::execute(repo, plan, &bar).await;
        bar.finish();
        Some(r.with_context(|| format!("expiring server {}", plan.server))?)
    };
    if json {
        return Ok(Some(serde_json::to_value(Report {
            plan,
            dry_run,
            executed: executed.as_ref(),
        })?));
    }
    match executed {
        None => outln!("dry run: nothing removed"),
        Some(e) => outln!(
            "removed {} backup(s) and {} WAL file(s){}; their data stays in the repository until garbage collection",
            e.backups_removed,
            e.wal_removed,
            if e.already_gone > 0 {
                format!(" ({} already gone)", e.already_gone)
            } else {
                String::new()
            }
        ),
    }
    Ok(None)
}

/// The rules for `server`: its configuration, overridden by the flags.
fn rules_for(ctx: &Ctx, a: &ExpireArgs, server: &str) -> Result<Rules> {
    let mut rules = configured_rules(ctx, server)?;
    if let Some(n) = a.keep_last {
        rules.policy = Some(Policy::Redundancy(n));
    }
    if let Some(w) = &a.keep_within {
        rules.policy = Some(Policy::keep_within(w).map_err(anyhow::Error::msg)?);
    }
    if let Some(m) = a.minimum_redundancy {
        rules.minimum_redundancy = m;
    }
    Ok(rules)
}

/// Without `--server` and with several servers configured, every one of
/// them (as `barman cron` does): one cron line for the repository.
fn servers_to_expire(ctx: &Ctx, a: &ExpireArgs) -> Result<(Vec<String>, bool)> {
    if a.server.server.is_none() && ctx.settings.server.len() > 1 {
        let mut names: Vec<String> = ctx.settings.server.keys().cloned().collect();
        names.sort();
        for n in &names {
            crate::engine::catalog::validate_server(n).map_err(anyhow::Error::msg)?;
        }
        return Ok((names, true));
    }
    Ok((vec![ctx.server_name(&a.server)?], false))
}

pub async fn run(ctx: &Ctx, a: ExpireArgs) -> Result<()> {
    let (servers, all) = servers_to_expire(ctx, &a)?;
    let json = ctx.global.format == Format::Json;
    let mut work = Vec::new();
    for server in servers {
        let rules = rules_for(ctx, &a, &server)?;
        if rules.policy.is_some() {
            work.push((server, rules));
        } else if all {
            if !json {
                outln!("server {server}: no retention_policy in [server.{server}]; skipped");
            }
        } else {
            anyhow::bail!(
                "server {server} has no retention policy: set retention_policy in [server.{server}] \
                 (e.g. \"REDUNDANCY 2\" or \"RECOVERY WINDOW OF 7 DAYS\") or pass --keep-last N / --keep-within 7d"
            );
        }
    }
    if work.is_empty() {
        anyhow::bail!(
            "none of the configured servers has a retention policy: set retention_policy in their \
             [server.NAME] tables or pass --keep-last N / --keep-within 7d"
        );
    }
    let repo = ctx.open().await?;
    let mut reports = Vec::new();
    let mut failed = Vec::new();
    for (server, rules) in &work {
        let one = async {
            let facts = retention::load(&repo, server).await?;
            let backups = facts.backup_facts()?;
            let plan = retention::plan(&facts.archive, &backups, rules, now_unix());
            print_and_run(ctx, &repo, &plan, a.dry_run).await
        };
        match one.await {
            Ok(r) => reports.extend(r),
            // One server's failure does not stop the others' retention.
            Err(e) if all => {
                warnln!("pgcairn: error: expiring server {server}: {e:#}");
                failed.push(server.clone());
            }
            Err(e) => return Err(e),
        }
    }
    // `--gc`: one command for cron. What expire just removed becomes
    // garbage now and is reclaimed a grace period later, by a later run.
    let gc = if a.gc && !a.dry_run {
        let r = super::gc::collect(&repo).await?;
        if !json {
            super::gc::print_report(&r)?;
        }
        Some(r)
    } else {
        None
    };
    if json {
        let v = match (all, reports.pop(), gc) {
            (true, last, g) => {
                reports.extend(last);
                serde_json::json!({ "expire": reports, "gc": g })
            }
            (false, Some(e), Some(g)) => serde_json::json!({ "expire": e, "gc": g }),
            (false, Some(e), None) => e,
            (false, None, _) => serde_json::Value::Null,
        };
        outln!("{}", serde_json::to_string_pretty(&v)?);
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "expire failed for server(s) {} (errors above); the other servers were expired",
            failed.join(", ")
        );
    }
    Ok(())
}
