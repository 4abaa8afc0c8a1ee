//! The plugin's errors and their CNI error codes. This is the one place where failures become
//! the `{"code": N, "msg": ...}` JSON of the CNI specification; codes 0-99 are the spec's,
//! 100 and up are weft's own (documented in docs/cni.md).

use serde::Serialize;

use crate::types::CniVersion;

/// Everything that can make a CNI invocation fail.
#[derive(Debug, thiserror::Error)]
pub enum CniError {
    /// Code 1: the configuration's `cniVersion` (or the command for that version) is not supported.
    #[error("incompatible CNI version: {0}")]
    IncompatibleVersion(String),
    /// Code 2: a field the plugin does not support was set.
    #[error("unsupported field: {0}")]
    UnsupportedField(String),
    /// Code 3: the container is unknown or gone; the runtime need not clean up.
    #[error("container unknown or does not exist: {0}")]
    UnknownContainer(String),
    /// Code 4: a required environment variable is missing or invalid.
    #[error("invalid environment variable {var}: {reason}")]
    InvalidEnv { var: &'static str, reason: String },
    /// Code 5: reading stdin or another local I/O failed.
    #[error("I/O failure: {0}")]
    Io(String),
    /// Code 6: stdin is not valid JSON.
    #[error("failed to decode the network configuration: {0}")]
    Decode(String),
    /// Code 7: the network configuration is valid JSON but not a valid weft configuration.
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    /// Code 11: the agent is starting or unreachable; the runtime should retry.
    #[error("try again later: {0}")]
    TryAgainLater(String),
    /// Code 50: the plugin cannot serve ADD now (STATUS).
    #[error("the weft network is not available: {0}")]
    NotAvailable(String),
    /// Code 100: no free address in the requested subnet.
    #[error("no free address: {0}")]
    AddressExhausted(String),
    /// Code 101: CHECK found the container's network different from what was set up.
    #[error("check failed: {0}")]
    CheckFailed(String),
    /// Code 102: a requested static address is taken.
    #[error("address conflict: {0}")]
    AddressConflict(String),
    /// Code 103: the agent could not set up the kernel state.
    #[error("network setup failed: {0}")]
    Setup(String),
}

impl CniError {
    /// The CNI error code of this error.
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion(_) => 1,
            CniError::UnsupportedField(_) => 2,
            CniError::UnknownContainer(_) => 3,
            CniError::InvalidEnv { .. } => 4,
            CniError::Io(_) => 5,
            CniError::Decode(_) => 6,
            CniError::InvalidConfig(_) => 7,
            CniError::TryAgainLater(_) => 11,
            CniError::NotAvailable(_) => 50,
            CniError::AddressExhausted(_) => 100,
            CniError::CheckFailed(_) => 101,
            CniError::AddressConflict(_) => 102,
            CniError::Setup(_) => 103,
        }
    }

    /// The error as the JSON object the CNI specification prescribes.
    pub fn to_json(&self, version: CniVersion) -> serde_json::Value {
        #[derive(Serialize)]
        #[serde(rename_all = "camelCase")]
        struct ErrorJson<'a> {
            cni_version: &'a str,
            code: u32,
            msg: String,
        }
        let msg = self.to_string();
        serde_json::to_value(ErrorJson { cni_version: version.as_str(), code: self.code(), msg })
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_spec() {
        let cases = [
            (CniError::IncompatibleVersion("x".into()), 1),
            (CniError::InvalidEnv { var: "CNI_NETNS", reason: "missing".into() }, 4),
            (CniError::Decode("x".into()), 6),
            (CniError::InvalidConfig("x".into()), 7),
            (CniError::TryAgainLater("x".into()), 11),
            (CniError::NotAvailable("x".into()), 50),
        ];
        for (err, code) in cases {
            assert_eq!(err.code(), code, "{err}");
            let json = err.to_json(CniVersion::V1_1_0);
            assert_eq!(json["code"], code);
            assert_eq!(json["cniVersion"], "1.1.0");
            assert!(json["msg"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    #[test]
    fn env_errors_name_the_variable() {
        let err = CniError::InvalidEnv { var: "CNI_IFNAME", reason: "missing".into() };
        assert!(err.to_string().contains("CNI_IFNAME"));
    }
}
