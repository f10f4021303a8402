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
pub fn print_plan(p: &Plan) {
    println!(
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
        println!(
            "  {verb} {}  ended {}  {:<25} {}",
            b.backup_id,
            utc_stamp(b.stop_time),
            b.status.to_string(),
            b.reason
        );
    }
    match &p.wal_cutoff {
        None => println!("  WAL: no backup is retained by the policy; no WAL is removed"),
        Some(c) => {
            print!(
                "  WAL: keeping everything from {} (start of backup {}, the oldest retained) and what pinned backups need; ",
                c.segment, c.backup_id
            );
            match (p.remove_wal.first(), p.remove_wal.last()) {
                (Some(a), Some(z)) => println!(
                    "removing {} file(s), {} .. {}; {} stay",
                    p.remove_wal.len(),
                    file_of(a),
                    file_of(z),
                    p.keep_wal
                ),
                _ => println!("nothing to remove; {} file(s) stay", p.keep_wal),
            }
        }
    }
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
        print_plan(plan);
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
        None => println!("dry run: nothing removed"),
        Some(e) => println!(
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

pub async fn run(ctx: &Ctx, a: ExpireArgs) -> Result<()> {
    let server = ctx.server_name(&a.server)?;
    let mut rules = configured_rules(ctx, &server)?;
    if let Some(n) = a.keep_last {
        rules.policy = Some(Policy::Redundancy(n));
    }
    if let Some(w) = &a.keep_within {
        rules.policy = Some(Policy::keep_within(w).map_err(anyhow::Error::msg)?);
    }
    if let Some(m) = a.minimum_redundancy {
        rules.minimum_redundancy = m;
    }
    if rules.policy.is_none() {
        anyhow::bail!(
            "server {server} has no retention policy: set retention_policy in [server.{server}] \
             (e.g. \"REDUNDANCY 2\" or \"RECOVERY WINDOW OF 7 DAYS\") or pass --keep-last N / --keep-within 7d"
        );
    }
    let repo = ctx.open().await?;
    let facts = retention::load(&repo, &server).await?;
    let backups = facts.backup_facts()?;
    let plan = retention::plan(&facts.archive, &backups, &rules, now_unix());
    let report = print_and_run(ctx, &repo, &plan, a.dry_run).await?;
    // `--gc`: one command for cron. What expire just removed becomes
    // garbage now and is reclaimed a grace period later, by a later run.
    let gc = if a.gc && !a.dry_run {
        let r = super::gc::collect(&repo).await?;
        if report.is_none() {
            super::gc::print_report(&r);
        }
        Some(r)
    } else {
        None
    };
    match (report, gc) {
        (Some(e), Some(g)) => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "expire": e, "gc": g }))?
        ),
        (Some(e), None) => println!("{}", serde_json::to_string_pretty(&e)?),
        (None, _) => {}
    }
    Ok(())
}
