//! The worker's side of disaster recovery: installing a staged backup into a brand-new
//! one-node cluster, and forcing a new one-node cluster on the survivor of a lost majority.
//! Both answer their backend directly, with the reason when refused.

use std::time::Instant;

use pgrx::prelude::*;
use raft_kv_core::node::RecoveryError;
use raft_kv_core::storage::StoreError;

use super::{Client, RaftLoop};
use crate::requests;
use crate::shmem::Outcome;
use crate::spi::{in_txn, spi_err};

impl RaftLoop {
    /// Installs the backup staged in `raft_kv.restore` and empties it, in one transaction.
    pub(super) fn restore(&mut self, (slot, gen): Client) {
        let started = Instant::now();
        let result = in_txn(|| {
            let mut seq: i64 = 0;
            let next = || -> Result<Option<(u32, Vec<u8>)>, StoreError> {
                let row = Spi::connect(|c| {
                    let t = c
                        .select(
                            "SELECT seq, record FROM raft_kv.restore WHERE seq >= $1 ORDER BY seq LIMIT 1",
                            None,
                            &[seq.into()],
                        )
                        .map_err(spi_err)?;
                    if t.is_empty() {
                        return Ok(None);
                    }
                    let r = t.first();
                    let s = r.get::<i32>(1).map_err(spi_err)?.unwrap_or(-1);
                    Ok::<_, StoreError>(Some((s, r.get::<Vec<u8>>(2).map_err(spi_err)?.unwrap_or_default())))
                })?;
                Ok(row.map(|(s, bytes)| {
                    seq = s as i64 + 1;
                    (s.max(0) as u32, bytes)
                }))
            };
            let header = self.node.restore(next)?;
            Spi::run("DELETE FROM raft_kv.restore").map_err(spi_err)?;
            Ok::<_, RecoveryError>(header)
        });
        match result {
            Ok(h) => {
                let now = crate::shmem::mono_ms();
                self.leases.load(h.leases.clone(), now);
                self.leases.restart_all(now);
                pgrx::log!(
                    "raft_kv: node {} restored a backup of cluster {:032x} (node {}, index {}): revision {}, {} keys, \
                     {} history records, {} leases, in {} ms",
                    self.me,
                    h.source_cluster,
                    h.node,
                    h.index,
                    h.revision,
                    h.kv_rows,
                    h.change_rows,
                    h.leases.len(),
                    started.elapsed().as_millis()
                );
                requests::complete(slot, gen, Outcome::Ok, (h.revision as i64, true, Some(true), 0), "");
            }
            Err(RecoveryError::Refused(why)) => {
                requests::complete(slot, gen, Outcome::Refused, (0, false, None, 0), &why)
            }
            Err(RecoveryError::Backup(e)) => {
                requests::complete(slot, gen, Outcome::Invalid, (0, false, None, 0), &e.to_string())
            }
            Err(RecoveryError::Node(e)) => {
                let why = format!("the backup could not be installed: {e}");
                requests::complete(slot, gen, Outcome::Invalid, (0, false, None, 0), &why)
            }
        }
    }

    /// First step of forcing a new cluster: every entry this node holds is committed, to be
    /// applied by the loop; `continue_force` finishes once they are.
    pub(super) fn force_new_cluster(&mut self, client: Client) {
        let now = crate::shmem::mono_ms();
        let recent = self.patience.as_millis() as u64;
        let reachable: Vec<u64> = self
            .contact
            .iter()
            .filter(|(_, &(last, up))| up || (last > 0 && now.saturating_sub(last) < recent))
            .map(|(&id, _)| id)
            .collect();
        match self.node.force_commit_all(&reachable) {
            Ok(last) => {
                pgrx::log!(
                    "raft_kv: node {} forces a new cluster: applying every entry it holds, up to index {last}",
                    self.me
                );
                self.forcing = Some((last, client));
            }
            Err(e) => requests::complete(client.0, client.1, Outcome::Refused, (0, false, None, 0), &e.to_string()),
        }
    }

    /// Second step, once the entries are applied: this node becomes the only voter, durably,
    /// and the worker restarts on that configuration.
    pub(super) fn continue_force(&mut self) {
        let Some((last, (slot, gen))) = self.forcing else { return };
        if self.node.storage().applied() < last || self.node.has_ready() {
            return;
        }
        self.forcing = None;
        match in_txn(|| self.node.force_single_voter()) {
            Ok(()) => {
                pgrx::log!(
                    "raft_kv: node {} is now the only voter of cluster {:032x} at index {last}; restarting its worker",
                    self.me,
                    self.cluster_id
                );
                requests::complete(slot, gen, Outcome::Ok, (last as i64, true, Some(true), 0), "");
                self.restart = true;
            }
            Err(RecoveryError::Node(e)) => pgrx::error!("raft_kv: forcing a new cluster failed: {e}"),
            Err(e) => requests::complete(slot, gen, Outcome::Refused, (0, false, None, 0), &e.to_string()),
        }
    }
}
