//! `REQUIRE_TLS=true`: a service that would speak plaintext to anything
//! refuses to start.
//!
//! Checked with the other settings, before anything connects, each failure
//! one line that names the setting and never its value:
//!
//! | setting | TLS means |
//! |---|---|
//! | `DATABASE_URL`, `DATABASE_MIGRATION_URL` | `sslmode=require`, which here verifies the server's certificate and name (`disable` and `prefer`, which falls back to plaintext silently, are refused) |
//! | `AMQP_URL` | every entry `amqps://` (verified against the Mozilla roots and `AMQP_CA_FILE`) |
//! | gRPC | `GRPC_TLS_CERT` and `GRPC_TLS_KEY` set |
//!
//! Off by default, for development against local servers; production
//! manifests set it (the Kubernetes overlay does).

use crate::config::HostConfig;

/// The first setting of `config` that would speak plaintext while
/// `REQUIRE_TLS` is on, as one line; `Ok` when it is off.
pub(crate) fn check(config: &HostConfig) -> Result<(), String> {
    if !config.require_tls {
        return Ok(());
    }
    if !config.database.is_tls() {
        let setting = if config.database.migration_url.is_some() {
            "DATABASE_URL or DATABASE_MIGRATION_URL"
        } else {
            "DATABASE_URL"
        };
        return Err(format!(
            "REQUIRE_TLS is on, but {setting} does not require TLS: add sslmode=require \
             (the server's certificate is verified against the Mozilla roots and DATABASE_CA_FILE)"
        ));
    }
    if !config.amqp.is_tls() {
        return Err(
            "REQUIRE_TLS is on, but AMQP_URL names a plaintext broker: use amqps:// (port 5671) for every entry"
                .to_owned(),
        );
    }
    if config.grpc.tls_cert.is_none() || config.grpc.tls_key.is_none() {
        return Err(
            "REQUIRE_TLS is on, but gRPC would be served in plaintext: set GRPC_TLS_CERT and GRPC_TLS_KEY"
                .to_owned(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secure() -> HostConfig {
        let mut config: HostConfig = shop_config::defaults();
        config.require_tls = true;
        config.database.url = "postgres://app:s3cret@db/users?sslmode=require".into();
        config.amqp.url = "amqps://app:s3cret@mq-1/%2f,amqps://app:s3cret@mq-2/%2f".into();
        config.grpc.tls_cert = Some("/tls/cert.pem".into());
        config.grpc.tls_key = Some("/tls/key.pem".into());
        config
    }

    #[test]
    fn every_plaintext_connection_is_refused_naming_its_setting_only() {
        assert_eq!(check(&secure()), Ok(()));
        type Weaken = fn(&mut HostConfig);
        let cases: [(&str, Weaken); 6] = [
            ("DATABASE_URL", |c| {
                c.database.url = "postgres://app:s3cret@db/users?sslmode=prefer".into();
            }),
            ("DATABASE_URL", |c| {
                c.database.url = "postgres://app:s3cret@db/users".into();
            }),
            ("DATABASE_MIGRATION_URL", |c| {
                c.database.migration_url = Some("postgres://owner:s3cret@db/users?sslmode=disable".into());
            }),
            ("AMQP_URL", |c| {
                c.amqp.url = "amqps://app:s3cret@mq-1/%2f,amqp://app:s3cret@mq-2/%2f".into();
            }),
            ("GRPC_TLS_CERT", |c| c.grpc.tls_cert = None),
            ("GRPC_TLS_KEY", |c| c.grpc.tls_key = None),
        ];
        for (setting, weaken) in cases {
            let mut config = secure();
            weaken(&mut config);
            let line = check(&config).unwrap_err();
            assert!(line.contains(setting), "{setting}: {line}");
            assert!(!line.contains("s3cret") && !line.contains('\n'), "{line}");
        }
    }

    #[test]
    fn nothing_is_required_when_it_is_off() {
        let mut config = secure();
        config.require_tls = false;
        config.database.url = "postgres://app:s3cret@db/users?sslmode=disable".into();
        config.amqp.url = "amqp://app:s3cret@mq/%2f".into();
        config.grpc.tls_cert = None;
        assert_eq!(check(&config), Ok(()));
    }
}
