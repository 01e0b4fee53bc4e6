//! L4 authorization policies, as upstream's local config describes them. Evaluation comes
//! with the control-plane issue; parsing them strictly now refuses bad files early.

use serde::{Deserialize, Serialize};

/// Policy scope.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum Scope {
    /// Every workload.
    Global,
    /// The policy's namespace.
    Namespace,
    /// Workloads listing the policy in `authorizationPolicies`.
    WorkloadSelector,
}

/// Policy action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum Action {
    /// Allow matching connections.
    Allow,
    /// Deny matching connections.
    Deny,
}

/// A string match. Read from upstream's `{Exact: s}` maps (and from `!Exact s` tags).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// Ends with.
    Suffix(String),
    /// Present at all.
    Presence(Vec<String>),
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        use serde_yaml_ng::Value;
        let (kind, value) = match Value::deserialize(d)? {
            Value::Mapping(m) if m.len() == 1 => {
                let (k, v) = m
                    .into_iter()
                    .next()
                    .ok_or_else(|| D::Error::custom("empty"))?;
                (k.as_str().map(str::to_string), v)
            }
            Value::Tagged(t) => (
                Some(t.tag.to_string().trim_start_matches('!').to_string()),
                t.value,
            ),
            _ => (None, Value::Null),
        };
        let text = || value.as_str().map(str::to_string);
        let bad = || {
            D::Error::custom(
                "a string match is one of {Exact: s}, {Prefix: s}, {Suffix: s}, {Presence: []}",
            )
        };
        match kind.as_deref() {
            Some("Exact") => text().map(StringMatch::Exact).ok_or_else(bad),
            Some("Prefix") => text().map(StringMatch::Prefix).ok_or_else(bad),
            Some("Suffix") => text().map(StringMatch::Suffix).ok_or_else(bad),
            Some("Presence") => Ok(StringMatch::Presence(Vec::new())),
            _ => Err(bad()),
        }
    }
}

/// A service account reference.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

/// One match: every populated field must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", default)]
pub struct RbacMatch {
    /// Source namespaces.
    pub namespaces: Vec<StringMatch>,
    /// Not these source namespaces.
    pub not_namespaces: Vec<StringMatch>,
    /// Source principals.
    pub principals: Vec<StringMatch>,
    /// Not these principals.
    pub not_principals: Vec<StringMatch>,
    /// Source service accounts.
    pub service_accounts: Vec<ServiceAccountMatch>,
    /// Not these service accounts.
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    /// Source CIDRs.
    pub source_ips: Vec<String>,
    /// Not these source CIDRs.
    pub not_source_ips: Vec<String>,
    /// Destination CIDRs.
    pub destination_ips: Vec<String>,
    /// Not these destination CIDRs.
    pub not_destination_ips: Vec<String>,
    /// Destination ports.
    pub destination_ports: Vec<u16>,
    /// Not these destination ports.
    pub not_destination_ports: Vec<u16>,
}

/// An authorization policy.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Scope.
    pub scope: Scope,
    /// Action.
    pub action: Action,
    /// Rules (OR) of clauses (AND) of matches (OR).
    pub rules: Vec<Vec<Vec<RbacMatch>>>,
    /// Only log, never enforce.
    #[serde(default)]
    pub dry_run: bool,
}

impl Authorization {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}
