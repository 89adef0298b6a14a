//! `shop event-keys new`: a producer's event signing key, and the line that
//! makes consumers trust it (see `shop_messaging::signing`).
//!
//! ```text
//! shop event-keys new --id user-service-2026-12 \
//!     --private user-service.key --public user-events.keys
//! ```
//!
//! writes the private key (PKCS#8 PEM, readable by its owner only) unless
//! the file exists already, in which case that key is kept, and adds the
//! key's public line `<id> <public key>` to the public file unless it is
//! there. So it can run at every start (compose's one-shot `event-keys`,
//! `shop up`) and makes a key only the first time; the public file may list
//! other keys (the old one, during a rotation), which stay.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use secrecy::ExposeSecret as _;
use shop_messaging::signing::{PrivateKey, SigningKey, TrustedKeys};

/// `shop event-keys new`.
#[derive(Debug, Clone, clap::Args)]
pub struct NewKey {
    /// The key's id (`EVENT_SIGNING_KEY_ID`), e.g. user-service-2026-12.
    #[arg(long, value_parser = shop_messaging::signing::key_id)]
    pub id: String,
    /// The private key's file (`EVENT_SIGNING_KEY_FILE` of the producer);
    /// kept if it exists.
    #[arg(long)]
    pub private: PathBuf,
    /// The consumers' keys file (e.g. `USER_EVENTS_KEYS_FILE`): the key's
    /// public line is added unless it is there.
    #[arg(long)]
    pub public: PathBuf,
    /// Give both files (and the folders made for them) to this user and
    /// group, `UID:GID`: for a one-shot container that runs as root to fill
    /// a volume the service reads as its own user.
    #[arg(long, value_name = "UID:GID", value_parser = owner)]
    pub owner: Option<(u32, u32)>,
}

fn owner(value: &str) -> Result<(u32, u32), String> {
    let (user, group) = value
        .split_once(':')
        .ok_or_else(|| format!("{value:?} is not UID:GID"))?;
    Ok((
        user.parse().map_err(|_| format!("{user:?} is not a user id"))?,
        group
            .parse()
            .map_err(|_| format!("{group:?} is not a group id"))?,
    ))
}

/// What [`ensure`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ensured {
    /// The key's public line.
    pub line: String,
    /// Whether the private key was made now (false: it existed).
    pub made: bool,
}

/// Makes (or keeps) the private key and puts its public line in the public
/// file; see the module docs.
pub fn ensure(args: &NewKey) -> anyhow::Result<Ensured> {
    make_parent(&args.private, args.owner)?;
    make_parent(&args.public, args.owner)?;
    let (key, made) = if args.private.exists() {
        let key = PrivateKey::from_file(&args.private)?;
        (SigningKey::new(&args.id, key).map_err(anyhow::Error::msg)?, false)
    } else {
        let (key, pem) = SigningKey::generate(&args.id)?;
        write_new(&args.private, pem.expose_secret().as_bytes(), 0o600)?;
        (key, true)
    };
    let line = key.trusted_line();
    let existing = match std::fs::read_to_string(&args.public) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => {
            return Err(anyhow::Error::new(error).context(format!("reading {}", args.public.display())));
        }
    };
    let listed = existing
        .lines()
        .any(|listed| listed.split('#').next().unwrap_or_default().trim() == line);
    if !listed {
        if let Ok(trusted) = TrustedKeys::parse(&existing) {
            anyhow::ensure!(
                !trusted.ids().any(|id| id == args.id),
                "{} lists key id {} with another public key; give the new key another id",
                args.public.display(),
                args.id
            );
        }
        let mut text = existing;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&line);
        text.push('\n');
        std::fs::write(&args.public, text).map_err(|error| {
            anyhow::Error::new(error).context(format!("writing {}", args.public.display()))
        })?;
    }
    if let Some((user, group)) = args.owner {
        for path in [&args.private, &args.public] {
            std::os::unix::fs::chown(path, Some(user), Some(group))
                .map_err(|error| anyhow::Error::new(error).context(format!("chown {}", path.display())))?;
        }
    }
    Ok(Ensured { line, made })
}

fn make_parent(path: &Path, owner: Option<(u32, u32)>) -> anyhow::Result<()> {
    let Some(parent) = path.parent().filter(|parent| !parent.as_os_str().is_empty()) else {
        return Ok(());
    };
    if !parent.exists() {
        std::fs::create_dir_all(parent)
            .map_err(|error| anyhow::Error::new(error).context(format!("creating {}", parent.display())))?;
        if let Some((user, group)) = owner {
            std::os::unix::fs::chown(parent, Some(user), Some(group))
                .map_err(|error| anyhow::Error::new(error).context(format!("chown {}", parent.display())))?;
        }
    }
    Ok(())
}

/// Writes a file that must not exist yet, with `mode`.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|error| anyhow::Error::new(error).context(format!("creating {}", path.display())))?;
    file.write_all(contents)?;
    file.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_and_its_line_listed_once_beside_other_keys() {
        let dir = std::env::temp_dir().join(format!("shop-keys-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let args = NewKey {
            id: "user-1".to_owned(),
            private: dir.join("private/user.key"),
            public: dir.join("public/user-events.keys"),
            owner: None,
        };
        std::fs::create_dir_all(dir.join("public")).unwrap();
        let (old, _) = SigningKey::generate("user-0").unwrap();
        std::fs::write(&args.public, format!("# keys\n{}", old.trusted_line())).unwrap();

        let first = ensure(&args).unwrap();
        let again = ensure(&args).unwrap();

        assert!(first.made && !again.made);
        assert_eq!(first.line, again.line);
        let public = std::fs::read_to_string(&args.public).unwrap();
        let trusted = TrustedKeys::parse(&public).unwrap();
        assert_eq!(trusted.ids().collect::<Vec<_>>(), ["user-0", "user-1"]);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&args.private).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // The same id with another key is refused, not listed twice.
        let other = NewKey {
            private: dir.join("private/other.key"),
            ..args.clone()
        };
        assert!(
            ensure(&other)
                .unwrap_err()
                .to_string()
                .contains("another public key")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
