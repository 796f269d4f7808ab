//! The plugin's arguments, from its plugstack.conf line:
//!
//! ```text
//! required /usr/lib/x86_64-linux-gnu/slurm/libslurm_egress.so config=/etc/slurm/egress.toml
//! ```
//!
//! Only `config=<absolute path>` is known; anything else is an error, so a typo fails slurmd's
//! start instead of being ignored.

use std::path::PathBuf;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PluginArgs {
    /// `config=`: the plugin's configuration file. Not read here.
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArgsError {
    #[error("unknown plugstack argument {0:?} (known: config=/path)")]
    Unknown(String),
    #[error("plugstack argument config= given twice")]
    Duplicate,
    #[error("plugstack argument config= needs an absolute path, got {0:?}")]
    NotAbsolute(String),
}

impl PluginArgs {
    pub fn parse<I, S>(args: I) -> Result<PluginArgs, ArgsError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut out = PluginArgs::default();
        for arg in args {
            let arg = arg.as_ref();
            match arg.split_once('=') {
                Some(("config", path)) => {
                    if out.config.is_some() {
                        return Err(ArgsError::Duplicate);
                    }
                    if !path.starts_with('/') {
                        return Err(ArgsError::NotAbsolute(path.to_owned()));
                    }
                    out.config = Some(PathBuf::from(path));
                }
                _ => return Err(ArgsError::Unknown(arg.to_owned())),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_config() {
        let a = PluginArgs::parse(["config=/etc/slurm/egress.toml"]).unwrap();
        assert_eq!(a.config.unwrap(), PathBuf::from("/etc/slurm/egress.toml"));
        assert_eq!(
            PluginArgs::parse::<_, &str>([]).unwrap(),
            PluginArgs::default()
        );
    }

    #[test]
    fn rejects_the_rest() {
        assert_eq!(
            PluginArgs::parse(["conf=/x"]),
            Err(ArgsError::Unknown("conf=/x".into()))
        );
        assert_eq!(
            PluginArgs::parse(["verbose"]),
            Err(ArgsError::Unknown("verbose".into()))
        );
        assert_eq!(
            PluginArgs::parse(["config=/a", "config=/b"]),
            Err(ArgsError::Duplicate)
        );
        assert_eq!(
            PluginArgs::parse(["config=egress.toml"]),
            Err(ArgsError::NotAbsolute("egress.toml".into()))
        );
        assert_eq!(
            PluginArgs::parse(["config="]),
            Err(ArgsError::NotAbsolute("".into()))
        );
    }
}
