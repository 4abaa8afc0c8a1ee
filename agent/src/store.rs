//! Crash-safe persistence of the agent's state in one redb file in the state directory
//! (`weft.db`). Every write is one transaction, committed and synced before the caller answers
//! anyone, so what a client was told survives a crash. Values are JSON with defaulted fields,
//! so a newer agent reads an older file. Only the owner of each piece of state writes it.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Named tables. Keys are strings; values are JSON documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Table {
    /// Small singletons: peer name, schema version, configured range...
    Meta,
    /// Endpoint records by endpoint id.
    Endpoints,
    /// The IP allocation ring and related IPAM state.
    Ipam,
    /// Mesh targets and related mesh state.
    Mesh,
    /// DNS records owned by this peer.
    Dns,
    /// Records that did not decode at start, moved aside from their table as they were
    /// (raw bytes, keyed `TABLE/KEY`), so one bad record never stops the agent.
    Quarantine,
}

impl Table {
    pub fn name(self) -> &'static str {
        match self {
            Table::Meta => "meta",
            Table::Endpoints => "endpoints",
            Table::Ipam => "ipam",
            Table::Mesh => "mesh",
            Table::Dns => "dns",
            Table::Quarantine => "quarantine",
        }
    }

    fn definition(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(self.name())
    }

    const ALL: [Table; 6] =
        [Table::Meta, Table::Endpoints, Table::Ipam, Table::Mesh, Table::Dns, Table::Quarantine];
}

/// The records of a table that decoded, by key, and the keys of those set aside.
pub type Loaded<T> = (Vec<(String, T)>, Vec<String>);

/// One change in a write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put(Table, String, Vec<u8>),
    Delete(Table, String),
}

impl Op {
    /// A put of `value` encoded as JSON.
    pub fn put(
        table: Table,
        key: impl Into<String>,
        value: &impl Serialize,
    ) -> Result<Op, StoreError> {
        Ok(Op::Put(table, key.into(), serde_json::to_vec(value).map_err(StoreError::Encode)?))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the state file {0} is in use by another weft agent (one agent per --state-dir)")]
    InUse(PathBuf),
    // The inner errors are part of the message, not `source`s, so a chain prints them once.
    #[error("state file {path}: {error}")]
    Open { path: PathBuf, error: redb::Error },
    #[error("state file: {0}")]
    Db(redb::Error),
    #[error("encoding a record: {0}")]
    Encode(serde_json::Error),
    #[error("decoding record {key} of {table:?}: {error}")]
    Decode { table: Table, key: String, error: serde_json::Error },
}

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> StoreError {
        StoreError::Db(e)
    }
}

fn db_err(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Db(e.into())
}

/// The agent's state file.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

pub const STATE_FILE: &str = "weft.db";

impl Store {
    /// Opens (creating if needed) the state file in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let path = dir.join(STATE_FILE);
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse(path.clone()),
            other => StoreError::Open { path: path.clone(), error: other.into() },
        })?;
        // The identity and every endpoint are in here: the owner only, whatever the umask.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| StoreError::Open { path: path.clone(), error: redb::Error::Io(e) })?;
        }
        let txn = db.begin_write().map_err(db_err)?;
        for t in Table::ALL {
            txn.open_table(t.definition()).map_err(db_err)?;
        }
        txn.commit().map_err(db_err)?;
        Ok(Store { db })
    }

    /// Applies `ops` atomically and durably.
    pub fn write(&self, ops: &[Op]) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(db_err)?;
        for op in ops {
            match op {
                Op::Put(t, k, v) => {
                    txn.open_table(t.definition())
                        .map_err(db_err)?
                        .insert(k.as_str(), v.as_slice())
                        .map_err(db_err)?;
                }
                Op::Delete(t, k) => {
                    txn.open_table(t.definition())
                        .map_err(db_err)?
                        .remove(k.as_str())
                        .map_err(db_err)?;
                }
            }
        }
        txn.commit().map_err(db_err)
    }

    /// Raw value of one key.
    pub fn get_raw(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(table.definition()).map_err(db_err)?;
        Ok(t.get(key).map_err(db_err)?.map(|v| v.value().to_vec()))
    }

    /// Decoded value of one key.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.get_raw(table, key)?
            .map(|v| {
                serde_json::from_slice(&v).map_err(|error| StoreError::Decode {
                    table,
                    key: key.to_owned(),
                    error,
                })
            })
            .transpose()
    }

    /// Every record of a table, decoded. Records that do not decode are reported, not skipped.
    pub fn all<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(String, T)>, StoreError> {
        let txn = self.db.begin_read().map_err(db_err)?;
        let t = txn.open_table(table.definition()).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            let key = k.value().to_owned();
            let val = serde_json::from_slice(v.value()).map_err(|error| StoreError::Decode {
                table,
                key: key.clone(),
                error,
            })?;
            out.push((key, val));
        }
        Ok(out)
    }

    /// Every record of a table that decodes, and the keys of those that do not, which are
    /// moved to [`Table::Quarantine`] (as they were, under `TABLE/KEY`) in one transaction:
    /// a bad record is kept for inspection and reported, and never stops a start.
    pub fn all_or_quarantine<T: DeserializeOwned>(
        &self,
        table: Table,
    ) -> Result<Loaded<T>, StoreError> {
        let mut good = Vec::new();
        let mut ops = Vec::new();
        let mut bad = Vec::new();
        {
            let txn = self.db.begin_read().map_err(db_err)?;
            let t = txn.open_table(table.definition()).map_err(db_err)?;
            for row in t.iter().map_err(db_err)? {
                let (k, v) = row.map_err(db_err)?;
                let key = k.value().to_owned();
                match serde_json::from_slice(v.value()) {
                    Ok(val) => good.push((key, val)),
                    Err(_) => {
                        let aside = format!("{}/{key}", table.name());
                        ops.push(Op::Put(Table::Quarantine, aside, v.value().to_vec()));
                        ops.push(Op::Delete(table, key.clone()));
                        bad.push(key);
                    }
                }
            }
        }
        self.write(&ops)?;
        Ok((good, bad))
    }

    /// Removes every record of a table (e.g. a ring for a range that changed).
    pub fn clear(&self, table: Table) -> Result<(), StoreError> {
        let keys: Vec<String> = {
            let txn = self.db.begin_read().map_err(db_err)?;
            let t = txn.open_table(table.definition()).map_err(db_err)?;
            let mut keys = Vec::new();
            for row in t.iter().map_err(db_err)? {
                keys.push(row.map_err(db_err)?.0.value().to_owned());
            }
            keys
        };
        let ops: Vec<Op> = keys.into_iter().map(|k| Op::Delete(table, k)).collect();
        self.write(&ops)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.write(&[
                Op::put(Table::Endpoints, "a", &vec![1, 2]).unwrap(),
                Op::put(Table::Endpoints, "b", &vec![3]).unwrap(),
                Op::put(Table::Meta, "peer", &"aa:bb").unwrap(),
            ])
            .unwrap();
            s.write(&[Op::Delete(Table::Endpoints, "a".into())]).unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let all: Vec<(String, Vec<i32>)> = s.all(Table::Endpoints).unwrap();
        assert_eq!(all, vec![("b".to_owned(), vec![3])]);
        assert_eq!(s.get::<String>(Table::Meta, "peer").unwrap().as_deref(), Some("aa:bb"));
        s.clear(Table::Endpoints).unwrap();
        assert!(s.all::<Vec<i32>>(Table::Endpoints).unwrap().is_empty());
    }

    #[test]
    fn a_second_agent_on_the_same_dir_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        assert!(matches!(Store::open(dir.path()), Err(StoreError::InUse(_))));
    }

    #[test]
    fn undecodable_records_are_moved_aside_and_the_others_load() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.write(&[
            Op::put(Table::Endpoints, "a", &1u32).unwrap(),
            Op::Put(Table::Endpoints, "b".into(), b"not json".to_vec()),
            Op::put(Table::Endpoints, "c", &3u32).unwrap(),
        ])
        .unwrap();
        let (good, bad) = s.all_or_quarantine::<u32>(Table::Endpoints).unwrap();
        assert_eq!(good, vec![("a".to_owned(), 1), ("c".to_owned(), 3)]);
        assert_eq!(bad, vec!["b".to_owned()]);
        assert_eq!(
            s.get_raw(Table::Quarantine, "endpoints/b").unwrap(),
            Some(b"not json".to_vec())
        );
        assert!(s.all::<u32>(Table::Endpoints).is_ok(), "the table decodes now");
        let (_, again) = s.all_or_quarantine::<u32>(Table::Endpoints).unwrap();
        assert!(again.is_empty());
    }

    #[test]
    fn undecodable_records_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.write(&[Op::Put(Table::Meta, "x".into(), b"not json".to_vec())]).unwrap();
        assert!(matches!(s.get::<u32>(Table::Meta, "x"), Err(StoreError::Decode { .. })));
    }
}
