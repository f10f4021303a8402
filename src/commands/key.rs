//! `pgcairn key list|add|remove|passwd`.

use anyhow::Result;

use super::Ctx;
use crate::cli::{Format, KeyCommand};
use crate::passphrase::new_passphrase;
use crate::repo::crypto::KdfParams;

pub async fn run(ctx: &Ctx, cmd: KeyCommand) -> Result<()> {
    let repo = ctx.open().await?;
    match cmd {
        KeyCommand::List => {
            let keys = repo.list_keys().await?;
            if ctx.global.format == Format::Json {
                outln!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                for k in keys {
                    outln!(
                        "{}{}  created {}  {}@{}  {}",
                        k.id,
                        if k.current { " (current)" } else { "" },
                        k.created,
                        k.username,
                        k.hostname,
                        k.kdf
                    );
                }
            }
        }
        KeyCommand::Add => {
            let pw = new_passphrase(None).map_err(anyhow::Error::msg)?;
            let id = repo.add_key(&pw, KdfParams::from_env()?).await?;
            outln!("added key {id}");
        }
        KeyCommand::Remove { id } => {
            repo.remove_key(&id).await?;
            outln!("removed key {id}; copies made before (backups of the repository, object versions) still open with it");
        }
        KeyCommand::Passwd => {
            let pw = new_passphrase(None).map_err(anyhow::Error::msg)?;
            let old = repo.current_key().to_string();
            let id = repo.add_key(&pw, KdfParams::from_env()?).await?;
            repo.remove_key(&old).await?;
            outln!("replaced key {old} with {id}");
        }
    }
    Ok(())
}
