//! IPv4 forwarding, per interface: on for inside and outside, nowhere else.
//!
//! The kernel decides whether to forward a packet by the `forwarding` setting of the interface
//! it came in on, so turning it on for exactly the two interfaces is the narrowest switch there
//! is (`net.ipv4.ip_forward` would turn it on everywhere). The settings are per network
//! namespace, read and written through `/proc/sys/net/ipv4/conf/<interface>/forwarding`.
//!
//! `apply` records each value it changes, once, in `<state_dir>/forwarding`; `remove` writes
//! the recorded values back and deletes the record. So a router that forwarded before
//! (`ip_forward = 1` in sysctl.d, say) keeps forwarding after `remove`, and one that did not
//! stops. The record lives on tmpfs like the settings themselves: after a reboot both are gone.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::Error;

const PROC_CONF: &str = "/proc/sys/net/ipv4/conf";
const RECORD: &str = "forwarding";

/// The `forwarding` settings, under an injectable root (tests use a directory).
pub struct Sysctls {
    root: PathBuf,
}

impl Sysctls {
    pub fn new() -> Sysctls {
        Sysctls::at(PROC_CONF)
    }

    pub fn at(root: impl Into<PathBuf>) -> Sysctls {
        Sysctls { root: root.into() }
    }

    fn path(&self, interface: &str) -> PathBuf {
        self.root.join(interface).join("forwarding")
    }

    fn exists(&self, interface: &str) -> bool {
        self.path(interface).exists()
    }

    pub fn read(&self, interface: &str) -> Result<bool, Error> {
        let path = self.path(interface);
        let text = std::fs::read_to_string(&path).map_err(|source| Error::File {
            path: path.clone(),
            source,
        })?;
        match text.trim() {
            "0" => Ok(false),
            "1" => Ok(true),
            other => Err(Error::File {
                path,
                source: io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("unexpected value {other:?}"),
                ),
            }),
        }
    }

    pub fn write(&self, interface: &str, on: bool) -> Result<(), Error> {
        let path = self.path(interface);
        std::fs::write(&path, if on { "1\n" } else { "0\n" }).map_err(|source| Error::File {
            path: path.clone(),
            source: io::Error::new(
                source.kind(),
                format!("cannot write {}: {source}", u8::from(on)),
            ),
        })
    }

    /// The interfaces among `interfaces` that do not forward.
    pub fn diff<'a>(
        &self,
        interfaces: impl IntoIterator<Item = &'a str>,
    ) -> Result<Vec<Difference>, Error> {
        let mut out = Vec::new();
        for interface in interfaces {
            if !self.read(interface)? {
                out.push(Difference {
                    interface: interface.to_owned(),
                    live: false,
                });
            }
        }
        Ok(out)
    }
}

/// An interface that should forward and does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub interface: String,
    pub live: bool,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "net.ipv4.conf.{}.forwarding is {}, want 1",
            self.interface,
            u8::from(self.live)
        )
    }
}

/// The values `apply` found before it changed them.
#[derive(Debug)]
pub struct Record {
    path: PathBuf,
    pub before: BTreeMap<String, bool>,
}

impl Record {
    /// The record in `state_dir`; empty when there is none.
    pub fn read(state_dir: &Path) -> Result<Record, Error> {
        let path = state_dir.join(RECORD);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(Error::File { path, source }),
        };
        let mut before = BTreeMap::new();
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            match line.split_whitespace().collect::<Vec<_>>()[..] {
                [interface, "0"] => before.insert(interface.to_owned(), false),
                [interface, "1"] => before.insert(interface.to_owned(), true),
                _ => {
                    return Err(Error::File {
                        path,
                        source: io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("cannot read the line {line:?}"),
                        ),
                    });
                }
            };
        }
        Ok(Record { path, before })
    }

    /// Remembers `interface`'s value unless an earlier apply already did: the first value
    /// seen is the one from before slurm-egress.
    pub fn remember(&mut self, interface: &str, value: bool) {
        self.before.entry(interface.to_owned()).or_insert(value);
    }

    pub fn save(&self) -> Result<(), Error> {
        let mut text = String::from(
            "# Forwarding before `slurm-egress router apply`; `router remove` restores it.\n",
        );
        for (interface, on) in &self.before {
            text += &format!("{interface} {}\n", u8::from(*on));
        }
        super::write_file(&self.path, &text)
    }
}

/// Writes the recorded values back and deletes the record; a line per change.
pub fn restore(sysctls: &Sysctls, state_dir: &Path) -> Result<Vec<String>, Error> {
    let record = Record::read(state_dir)?;
    let mut done = Vec::new();
    for (interface, before) in &record.before {
        if !sysctls.exists(interface) {
            done.push(format!(
                "net.ipv4.conf.{interface}.forwarding not restored: the interface is gone"
            ));
            continue;
        }
        if sysctls.read(interface)? != *before {
            sysctls.write(interface, *before)?;
            done.push(format!(
                "net.ipv4.conf.{interface}.forwarding set back to {}",
                u8::from(*before)
            ));
        }
    }
    match std::fs::remove_file(&record.path) {
        Ok(()) => done.push(format!("deleted {}", record.path.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(Error::File {
                path: record.path,
                source,
            });
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let dir =
                std::env::temp_dir().join(format!("slurm-egress-fwd-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn proc_with(dir: &Path, values: &[(&str, &str)]) -> Sysctls {
        for (interface, value) in values {
            let d = dir.join("conf").join(interface);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("forwarding"), value).unwrap();
        }
        Sysctls::at(dir.join("conf"))
    }

    #[test]
    fn diff_names_each_interface_that_does_not_forward() {
        let dir = Dir::new("diff");
        let s = proc_with(&dir.0, &[("ib0", "0\n"), ("eth9", "1\n")]);
        let d = s.diff(["ib0", "eth9"]).unwrap();
        assert_eq!(
            d.iter().map(ToString::to_string).collect::<Vec<_>>(),
            ["net.ipv4.conf.ib0.forwarding is 0, want 1"]
        );
        let e = s.diff(["ib9"]).unwrap_err().to_string();
        assert!(e.contains("conf/ib9/forwarding"), "{e}");
    }

    #[test]
    fn the_first_recorded_value_wins_and_remove_restores_it() {
        let dir = Dir::new("record");
        let s = proc_with(&dir.0, &[("ib0", "0\n"), ("eth9", "1\n")]);
        let state = dir.0.join("state");
        // First apply: ib0 was off.
        let mut r = Record::read(&state).unwrap();
        assert!(r.before.is_empty());
        r.remember("ib0", false);
        r.save().unwrap();
        s.write("ib0", true).unwrap();
        // Someone turned ib0 off; the second apply must not record that as the original.
        s.write("ib0", false).unwrap();
        let mut r = Record::read(&state).unwrap();
        r.remember("ib0", false);
        r.remember("eth9", true);
        r.save().unwrap();
        s.write("ib0", true).unwrap();
        assert_eq!(
            std::fs::read_to_string(state.join("forwarding")).unwrap(),
            "# Forwarding before `slurm-egress router apply`; `router remove` restores it.\n\
             eth9 1\nib0 0\n"
        );
        let done = restore(&s, &state).unwrap();
        assert_eq!(done[0], "net.ipv4.conf.ib0.forwarding set back to 0");
        assert!(done[1].starts_with("deleted "), "{done:?}");
        assert_eq!(done.len(), 2, "eth9 forwarded before and still does");
        assert!((!s.read("ib0").unwrap()) && s.read("eth9").unwrap());
        assert_eq!(restore(&s, &state).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn a_damaged_record_is_an_error_naming_the_file() {
        let dir = Dir::new("bad");
        std::fs::write(dir.0.join("forwarding"), "ib0 yes\n").unwrap();
        let e = Record::read(&dir.0).unwrap_err().to_string();
        assert!(
            e.contains("/forwarding: cannot read the line \"ib0 yes\""),
            "{e}"
        );
    }
}
