//! Client certificates: the principal a certificate names and the
//! permissions `GRPC_TLS_CLIENT_PERMISSIONS` grants it. The certificate was
//! verified against `GRPC_TLS_CLIENT_CA` in the TLS handshake; here it is
//! only read, with `x509-parser`.

use std::collections::HashMap;
use std::sync::Arc;

use x509_parser::extensions::GeneralName;

use super::{Identity, Permission, Permissions, Principal};

/// Longest principal taken from a certificate.
const MAX_PRINCIPAL: usize = 256;

/// The principal of a DER certificate: its first URI subject alternative
/// name, else its first DNS name, else its subject's common name. `None`
/// when it has none of them or does not parse.
pub fn principal_name(der: &[u8]) -> Option<String> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der).ok()?;
    let names = certificate
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|extension| extension.value.general_names.clone())
        .unwrap_or_default();
    let uri = names.iter().find_map(|name| match name {
        GeneralName::URI(uri) => Some((*uri).to_owned()),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_owned()),
            _ => None,
        })
    };
    let common_name = || {
        certificate
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
    };
    uri.or_else(dns)
        .or_else(common_name)
        .filter(|name| !name.is_empty() && name.len() <= MAX_PRINCIPAL)
}

/// `GRPC_TLS_CLIENT_PERMISSIONS`: the permissions of each certificate
/// principal.
#[derive(Debug, Clone, Default)]
pub struct PermissionMap {
    by_principal: Arc<HashMap<String, Permissions>>,
}

impl PermissionMap {
    /// Parses `PRINCIPAL=PERMISSION,PERMISSION;PRINCIPAL=*` (empty: no
    /// principal has a permission).
    pub fn parse(value: &str) -> Result<Self, String> {
        let mut by_principal = HashMap::new();
        for entry in value.split(';').map(str::trim).filter(|entry| !entry.is_empty()) {
            let (principal, permissions) = entry
                .rsplit_once('=')
                .ok_or_else(|| format!("{entry:?} is not PRINCIPAL=PERMISSION,..."))?;
            let principal = principal.trim();
            if principal.is_empty() {
                return Err(format!("{entry:?} names no principal"));
            }
            let permissions = permissions
                .split(',')
                .map(str::trim)
                .map(|name| match name {
                    "*" => Ok(Permissions::all()),
                    name => Permission::from_name(name)
                        .map(|permission| [permission].into_iter().collect())
                        .ok_or_else(|| {
                            format!(
                                "unknown permission {name:?}: expected one of {} or *",
                                Permission::names()
                            )
                        }),
                })
                .try_fold(Permissions::default(), |all, one| {
                    one.map(|one: Permissions| Permissions(all.0 | one.0))
                })?;
            if by_principal.insert(principal.to_owned(), permissions).is_some() {
                return Err(format!("{principal:?} is listed twice"));
            }
        }
        Ok(Self {
            by_principal: Arc::new(by_principal),
        })
    }

    /// The principal of the certificate `der`, with its permissions (none
    /// when not listed); `None` when the certificate names nobody.
    pub fn principal(&self, der: &[u8]) -> Option<Principal> {
        let name = principal_name(der)?;
        let permissions = self.by_principal.get(&name).copied().unwrap_or_default();
        Some(Principal::new(Identity::Service(Arc::from(name)), permissions))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn the_permission_map_reads_principals_and_their_permissions() {
        let map = PermissionMap::parse("spiffe://shop/ops=users:read, orders:read; batch=*").unwrap();

        let ops = map.by_principal["spiffe://shop/ops"];
        assert!(ops.contains(Permission::UsersRead) && ops.contains(Permission::OrdersRead));
        assert!(!ops.contains(Permission::UsersWrite));
        assert_eq!(map.by_principal["batch"], Permissions::all());
        assert!(PermissionMap::parse("").unwrap().by_principal.is_empty());
    }

    #[test]
    fn the_permission_map_refuses_what_it_cannot_read() {
        for bad in ["ops", "=users:read", "ops=users:admin", "a=*;a=users:read"] {
            assert!(PermissionMap::parse(bad).is_err(), "{bad:?}");
        }
    }
}
