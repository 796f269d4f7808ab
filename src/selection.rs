//! Who gets the egress path: the config's users, groups and accounts, resolved through NSS
//! into the uids and gids that nftables can match.
//!
//! nftables sees a socket's owner uid and *primary* gid only. A member of a selected group
//! through a supplementary group is therefore selected by uid: [`resolve`] expands every
//! selected group into its members (listed members and users whose primary group it is), and
//! [`job_reason`] asks NSS for a job owner's full group list at job start, which also covers
//! directories that cannot be enumerated.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::fmt;
use std::path::PathBuf;

use nix::unistd::{Gid, Group, Uid, User};

use crate::config::{Config, Located, Location, Principal, Select};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}:{at}: select.users: no user {name:?} (looked up through NSS)")]
    UnknownUser {
        path: PathBuf,
        at: Location,
        name: String,
    },
    #[error("{path}:{at}: select.groups: no group {name:?} (looked up through NSS)")]
    UnknownGroup {
        path: PathBuf,
        at: Location,
        name: String,
    },
    #[error("NSS lookup of {what} failed: {source}")]
    Nss {
        what: String,
        source: nix::errno::Errno,
    },
}

/// The statically selected principals, as nftables matches them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// Selected users, and every known member of a selected group.
    pub uids: BTreeSet<u32>,
    /// Selected groups, matched against a socket's primary gid: this catches members that NSS
    /// could not enumerate.
    pub gids: BTreeSet<u32>,
}

/// Resolves the `[select]` users and groups. An unknown name is an error naming its line; a
/// numeric id is taken as written (it may belong to a directory that is not reachable now).
pub fn resolve(select: &Select, path: &std::path::Path) -> Result<Selection, Error> {
    let mut selection = Selection::default();
    for user in &select.users {
        selection.uids.insert(user_id(user, path)?);
    }
    let mut names = Vec::new();
    for group in &select.groups {
        let (gid, members) = group_members(group, path)?;
        selection.gids.insert(gid);
        names.extend(members);
    }
    for name in names {
        // A listed member that no longer exists is the directory's problem, not the config's.
        if let Ok(Some(user)) = User::from_name(&name) {
            selection.uids.insert(user.uid.as_raw());
        }
    }
    if !selection.gids.is_empty() {
        selection
            .uids
            .extend(users_with_primary_group(&selection.gids));
    }
    Ok(selection)
}

fn user_id(user: &Located<Principal>, path: &std::path::Path) -> Result<u32, Error> {
    match &user.value {
        Principal::Id(uid) => Ok(*uid),
        Principal::Name(name) => match User::from_name(name) {
            Ok(Some(u)) => Ok(u.uid.as_raw()),
            Ok(None) => Err(Error::UnknownUser {
                path: path.to_owned(),
                at: user.at,
                name: name.clone(),
            }),
            Err(source) => Err(Error::Nss {
                what: format!("user {name:?}"),
                source,
            }),
        },
    }
}

/// A group's gid and the user names listed as its (supplementary) members.
fn group_members(
    group: &Located<Principal>,
    path: &std::path::Path,
) -> Result<(u32, Vec<String>), Error> {
    let (found, what) = match &group.value {
        Principal::Id(gid) => (Group::from_gid(Gid::from_raw(*gid)), format!("group {gid}")),
        Principal::Name(name) => (Group::from_name(name), format!("group {name:?}")),
    };
    match (found, &group.value) {
        (Ok(Some(g)), _) => Ok((g.gid.as_raw(), g.mem)),
        (Ok(None), Principal::Id(gid)) => Ok((*gid, Vec::new())),
        (Ok(None), Principal::Name(name)) => Err(Error::UnknownGroup {
            path: path.to_owned(),
            at: group.at,
            name: name.clone(),
        }),
        (Err(source), _) => Err(Error::Nss { what, source }),
    }
}

/// Users whose primary group is one of `gids`, from an enumeration of the user database.
/// Directories configured not to enumerate simply return fewer users; the gid match in
/// nftables and the job-time group check cover those.
fn users_with_primary_group(gids: &BTreeSet<u32>) -> BTreeSet<u32> {
    let mut uids = BTreeSet::new();
    // SAFETY: getpwent's iteration state is process-global; the binary calls this from one
    // thread, and every entry is copied out before the next call.
    unsafe {
        libc::setpwent();
        loop {
            let entry = libc::getpwent();
            if entry.is_null() {
                break;
            }
            if gids.contains(&(*entry).pw_gid) {
                uids.insert((*entry).pw_uid);
            }
        }
        libc::endpwent();
    }
    uids
}

/// Why a job is selected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// Charged to a selected Slurm account.
    Account(String),
    /// Its owner is a selected user.
    User,
    /// Its owner is in a selected group (primary or supplementary).
    Group(String),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Account(a) => write!(f, "account {a}"),
            Reason::User => f.write_str("user"),
            Reason::Group(g) => write!(f, "group {g}"),
        }
    }
}

/// Decides whether a job of `uid` charged to `account` is selected, and why. The account must
/// come from a source the user cannot forge (slurmd's own environment, set from the signed
/// job credential), never from the job's environment.
pub fn job_reason(
    config: &Config,
    uid: u32,
    account: Option<&str>,
) -> Result<Option<Reason>, Error> {
    if let Some(account) = account.filter(|a| config.selects_account(a)) {
        return Ok(Some(Reason::Account(account.to_lowercase())));
    }
    let select = &config.select;
    if select.users.is_empty() && select.groups.is_empty() {
        return Ok(None);
    }
    let user = User::from_uid(Uid::from_raw(uid)).map_err(|source| Error::Nss {
        what: format!("uid {uid}"),
        source,
    })?;
    let by_user = select.users.iter().any(|p| match (&p.value, &user) {
        (Principal::Id(id), _) => *id == uid,
        (Principal::Name(name), Some(u)) => *name == u.name,
        (Principal::Name(_), None) => false,
    });
    if by_user {
        return Ok(Some(Reason::User));
    }
    // A uid unknown to NSS has no groups to check.
    let Some(user) = user.filter(|_| !select.groups.is_empty()) else {
        return Ok(None);
    };
    let name = CString::new(user.name.as_str()).map_err(|_| Error::Nss {
        what: format!("user {:?}", user.name),
        source: nix::errno::Errno::EINVAL,
    })?;
    let gids = member_gids(&name, user.gid)?;
    for group in &select.groups {
        let matches = match &group.value {
            Principal::Id(gid) => gids.contains(gid),
            Principal::Name(gname) => match Group::from_name(gname) {
                Ok(Some(g)) => gids.contains(&g.gid.as_raw()),
                _ => false,
            },
        };
        if matches {
            return Ok(Some(Reason::Group(group.to_string())));
        }
    }
    Ok(None)
}

/// Every gid of a user, primary included, through NSS.
fn member_gids(name: &CStr, primary: Gid) -> Result<BTreeSet<u32>, Error> {
    let gids = nix::unistd::getgrouplist(name, primary).map_err(|source| Error::Nss {
        what: format!("groups of {name:?}"),
        source,
    })?;
    Ok(gids.into_iter().map(Gid::as_raw).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(select: &str) -> Config {
        let text = format!(
            "[routing]\ntable = 201\ntable_name = \"t\"\nmark = 1\nmask = 1\npriority = 1000\n\
             interface = \"lo\"\ngateway = \"10.20.0.1\"\nprotocols = [\"tcp\"]\n[select]\n{select}"
        );
        Config::parse(&text, Path::new("c.toml")).unwrap()
    }

    #[test]
    fn root_by_name_and_by_id() {
        let c = config("users = [\"root\", 4242]\ngroups = [\"root\"]");
        let s = resolve(&c.select, &c.path).unwrap();
        assert!(s.uids.contains(&0) && s.uids.contains(&4242));
        assert!(s.gids.contains(&0));
    }

    #[test]
    fn unknown_names_are_errors_naming_the_line() {
        let c = config("users = [\"root\",\n  \"no-such-user-slurm-egress\"]");
        let e = resolve(&c.select, &c.path).unwrap_err().to_string();
        assert_eq!(
            e,
            "c.toml:12:3: select.users: no user \"no-such-user-slurm-egress\" (looked up through NSS)"
        );
        let c = config("groups = [\"no-such-group-slurm-egress\"]");
        let e = resolve(&c.select, &c.path).unwrap_err().to_string();
        assert!(
            e.starts_with("c.toml:11:11: select.groups: no group"),
            "{e}"
        );
    }

    #[test]
    fn job_reasons() {
        let c = config("users = [4242]\ngroups = [\"root\"]\naccounts = [\"alice\"]");
        assert_eq!(
            job_reason(&c, 5555, Some("Alice")).unwrap(),
            Some(Reason::Account("alice".into()))
        );
        assert_eq!(
            job_reason(&c, 4242, Some("other")).unwrap(),
            Some(Reason::User)
        );
        assert_eq!(
            job_reason(&c, 0, None).unwrap(),
            Some(Reason::Group("root".into()))
        );
        // An id NSS does not know has no groups and is not selected.
        assert_eq!(job_reason(&c, 4_000_000, Some("other")).unwrap(), None);
    }
}
