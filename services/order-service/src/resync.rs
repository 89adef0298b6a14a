//! The order service's way to ask the user service for the users its
//! consumer misses: `UserService/ResyncUsers` with the ids of the users
//! stuck behind a gap, as the order service's own principal (the bearer
//! token in `CONSUMER_RESYNC_TOKEN_FILE`, read again when the file
//! changes), within `CONSUMER_RESYNC_TIMEOUT`. The consumer's gap policy
//! `resync` calls it ([`shop_messaging::resync`]).

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use secrecy::{ExposeSecret as _, SecretString};
use shop_contracts::user as pb;
use shop_contracts::user::user_service_client::UserServiceClient;
use shop_messaging::resync::{Requested, Resync};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Where the user service is and how to call it for re-synchronisation.
#[derive(Debug, Clone, clap::Args)]
pub struct ResyncConfig {
    /// The user service's gRPC address (`http://host:port`, or `https://`
    /// for TLS checked against Mozilla's roots) to ask for snapshots of the
    /// users stuck behind a gap (gap policy `resync`, the default once this
    /// is set). Unset: no resync.
    #[arg(long = "consumer-resync-url", env = "CONSUMER_RESYNC_URL", value_name = "URL")]
    pub url: Option<String>,
    /// A file holding the bearer token the order service calls
    /// `ResyncUsers` with (its own principal, with the `users:resync`
    /// permission); read again whenever the file changes, so a token is
    /// rotated by rewriting it. Required with `CONSUMER_RESYNC_URL`.
    #[arg(
        long = "consumer-resync-token-file",
        env = "CONSUMER_RESYNC_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub token_file: Option<PathBuf>,
    /// Deadline of one `ResyncUsers` call (up to 1000 users).
    #[arg(
        long = "consumer-resync-timeout",
        env = "CONSUMER_RESYNC_TIMEOUT",
        value_name = "DURATION",
        default_value = "60s",
        value_parser = shop_config::duration
    )]
    pub timeout: Duration,
    /// Send the token over plaintext (`http://`) to a host that is not this
    /// machine, where anyone on the path could read and replay it: only on
    /// a network you trust (a compose network without TLS).
    #[arg(
        long = "consumer-resync-allow-plaintext-token",
        env = "CONSUMER_RESYNC_ALLOW_PLAINTEXT_TOKEN",
        value_name = "BOOL",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub allow_plaintext_token: bool,
}

impl ResyncConfig {
    /// The settings' problems, named by setting (never a token's value).
    pub fn validate(&self) -> Result<(), String> {
        let (Some(url), Some(file)) = (&self.url, &self.token_file) else {
            return match (&self.url, &self.token_file) {
                (Some(_), None) => Err(
                    "CONSUMER_RESYNC_URL is set without CONSUMER_RESYNC_TOKEN_FILE: the order service \
                     calls ResyncUsers as its own principal, with the token in that file"
                        .to_owned(),
                ),
                (None, Some(_)) => {
                    Err("CONSUMER_RESYNC_TOKEN_FILE is set without CONSUMER_RESYNC_URL".to_owned())
                }
                _ => Ok(()),
            };
        };
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|error| format!("CONSUMER_RESYNC_URL is not a URL: {error}"))?;
        let scheme = endpoint.uri().scheme_str();
        let host = endpoint.uri().host().unwrap_or_default();
        match scheme {
            Some("https") => {}
            Some("http") if is_loopback(host) || self.allow_plaintext_token => {}
            Some("http") => {
                return Err(
                    "CONSUMER_RESYNC_URL: the token is sent over TLS (https://) or to this machine only, \
                     unless CONSUMER_RESYNC_ALLOW_PLAINTEXT_TOKEN=true"
                        .to_owned(),
                );
            }
            _ => return Err("CONSUMER_RESYNC_URL must be http:// or https://".to_owned()),
        }
        read_token(file).map(drop)
    }

    /// The client, when a URL is set (the settings validated).
    pub fn client(&self) -> anyhow::Result<Option<UserResync>> {
        let (Some(url), Some(file)) = (&self.url, &self.token_file) else {
            return Ok(None);
        };
        let mut endpoint = Endpoint::from_shared(url.clone())?
            .connect_timeout(Duration::from_secs(5))
            .timeout(self.timeout);
        if endpoint.uri().scheme_str() == Some("https") {
            endpoint = endpoint.tls_config(ClientTlsConfig::new().with_webpki_roots())?;
        }
        Ok(Some(UserResync {
            client: UserServiceClient::new(endpoint.connect_lazy()),
            token_file: file.clone(),
            token: Mutex::new(None),
            timeout: self.timeout,
        }))
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|address| address.is_loopback())
}

/// The token in `file`, trimmed; an error names the file, never the token.
fn read_token(file: &Path) -> Result<SecretString, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|error| format!("CONSUMER_RESYNC_TOKEN_FILE {}: {error}", file.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("CONSUMER_RESYNC_TOKEN_FILE {} is empty", file.display()));
    }
    Ok(SecretString::from(token.to_owned()))
}

/// Calls `ResyncUsers` for the consumer's gap policy.
#[derive(Debug)]
pub struct UserResync {
    client: UserServiceClient<Channel>,
    token_file: PathBuf,
    /// The token last read, and the file's modification time then.
    token: Mutex<Option<(Option<SystemTime>, SecretString)>>,
    timeout: Duration,
}

impl UserResync {
    /// The token, read again when the file changed since.
    fn token(&self) -> anyhow::Result<SecretString> {
        let modified = std::fs::metadata(&self.token_file)
            .and_then(|metadata| metadata.modified())
            .ok();
        let mut cached = self
            .token
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, token)) = cached.as_ref()
            && *at == modified
            && modified.is_some()
        {
            return Ok(token.clone());
        }
        let token = read_token(&self.token_file).map_err(anyhow::Error::msg)?;
        *cached = Some((modified, token.clone()));
        Ok(token)
    }
}

#[async_trait::async_trait]
impl Resync for UserResync {
    async fn request(&self, kind: &str, ids: &[String]) -> anyhow::Result<Requested> {
        if kind != "user" {
            return Ok(Requested::Unsupported);
        }
        let mut request = tonic::Request::new(pb::ResyncUsersRequest {
            selection: Some(pb::resync_users_request::Selection::Users(pb::UserIds {
                ids: ids.to_vec(),
            })),
            max_per_second: None,
        });
        request.set_timeout(self.timeout);
        let mut bearer: tonic::metadata::AsciiMetadataValue =
            format!("Bearer {}", self.token()?.expose_secret()).parse()?;
        bearer.set_sensitive(true);
        request.metadata_mut().insert("authorization", bearer);
        let mut client = self.client.clone();
        let call = async {
            let mut stream = client.resync_users(request).await?.into_inner();
            let mut last = pb::ResyncUsersProgress::default();
            while let Some(progress) = stream.message().await? {
                last = progress;
            }
            Ok::<_, tonic::Status>(last)
        };
        let answered = tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| anyhow::anyhow!("ResyncUsers took longer than CONSUMER_RESYNC_TIMEOUT"))?;
        let last = match answered {
            Ok(last) => last,
            // A user service that does not serve it yet.
            Err(status) if status.code() == tonic::Code::Unimplemented => return Ok(Requested::Unsupported),
            Err(status) => return Err(anyhow::Error::new(status).context("ResyncUsers")),
        };
        Ok(Requested::Written {
            written: last.written,
            unknown_ids: last.unknown_ids,
        })
    }
}
