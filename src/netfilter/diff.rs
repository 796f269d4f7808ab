//! Desired versus live: what differs, one line each.

use super::codec::RuleBuilder;
use super::live::{LiveRule, LiveTable};
use super::model::{Family, KeyType, Table};
use std::fmt;

/// One way the live table differs from the desired one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    TableMissing {
        family: Family,
        name: String,
    },
    /// The table has flags (e.g. dormant: nothing in it runs).
    TableFlags {
        flags: u32,
    },
    SetMissing {
        set: String,
    },
    SetUnexpected {
        set: String,
    },
    SetDefinition {
        set: String,
        live: String,
        want: String,
    },
    ElementMissing {
        set: String,
        key: KeyType,
        value: u64,
    },
    ElementUnexpected {
        set: String,
        key: KeyType,
        value: u64,
    },
    ChainMissing {
        chain: String,
    },
    ChainUnexpected {
        chain: String,
    },
    ChainDefinition {
        chain: String,
        live: String,
        want: String,
    },
    /// `position` counts from 1, in the desired chain.
    RuleDiffers {
        chain: String,
        position: usize,
        live: String,
        want: String,
    },
    RuleMissing {
        chain: String,
        position: usize,
        want: String,
    },
    /// `position` counts from 1, in the live chain.
    RuleUnexpected {
        chain: String,
        position: usize,
        live: String,
    },
}

impl Difference {
    /// Whether fixing this needs the table rebuilt; set elements are fixed in place.
    pub fn is_structural(&self) -> bool {
        !matches!(
            self,
            Difference::ElementMissing { .. } | Difference::ElementUnexpected { .. }
        )
    }
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use Difference::*;
        match self {
            TableMissing { family, name } => write!(f, "table {family} {name} is missing"),
            TableFlags { flags } => write!(f, "table has flags {flags:#x} (want none)"),
            SetMissing { set } => write!(f, "set {set} is missing"),
            SetUnexpected { set } => write!(f, "unexpected set {set}"),
            SetDefinition { set, live, want } => {
                write!(f, "set {set}: live \"{live}\" want \"{want}\"")
            }
            ElementMissing { set, key, value } => {
                write!(f, "set {set}: element {} missing", key.element(*value))
            }
            ElementUnexpected { set, key, value } => {
                write!(f, "set {set}: unexpected element {}", key.element(*value))
            }
            ChainMissing { chain } => write!(f, "chain {chain} is missing"),
            ChainUnexpected { chain } => write!(f, "unexpected chain {chain}"),
            ChainDefinition { chain, live, want } => {
                write!(f, "chain {chain}: live \"{live}\" want \"{want}\"")
            }
            RuleDiffers {
                chain,
                position,
                live,
                want,
            } => write!(
                f,
                "chain {chain}: rule {position} differs: live \"{live}\" want \"{want}\""
            ),
            RuleMissing {
                chain,
                position,
                want,
            } => write!(f, "chain {chain}: rule {position} missing: want \"{want}\""),
            RuleUnexpected {
                chain,
                position,
                live,
            } => write!(f, "chain {chain}: unexpected rule {position}: \"{live}\""),
        }
    }
}

/// Everything that differs between `desired` and the live table (`None`: absent). Empty means
/// in sync. Rules are compared by their kernel expressions, so a live rule equals a desired one
/// exactly when the kernel would run the same thing.
pub fn diff(desired: &Table, live: Option<&LiveTable>) -> Vec<Difference> {
    let Some(live) = live else {
        return vec![Difference::TableMissing {
            family: desired.family,
            name: desired.name.clone(),
        }];
    };
    let mut out = Vec::new();
    if live.flags != 0 {
        out.push(Difference::TableFlags { flags: live.flags });
    }
    for set in &desired.sets {
        let Some(l) = live.sets.iter().find(|l| l.name == set.name) else {
            out.push(Difference::SetMissing {
                set: set.name.clone(),
            });
            continue;
        };
        let want = set.definition();
        if l.definition != want || l.key != Some(set.key) {
            out.push(Difference::SetDefinition {
                set: set.name.clone(),
                live: l.definition.clone(),
                want,
            });
            continue;
        }
        let element = |value: &u64| (set.name.clone(), set.key, *value);
        for (set, key, value) in set.elements.difference(&l.elements).map(element) {
            out.push(Difference::ElementMissing { set, key, value });
        }
        for (set, key, value) in l.elements.difference(&set.elements).map(element) {
            out.push(Difference::ElementUnexpected { set, key, value });
        }
    }
    for l in &live.sets {
        if !desired.sets.iter().any(|s| s.name == l.name) {
            out.push(Difference::SetUnexpected {
                set: l.name.clone(),
            });
        }
    }
    let mut builder = RuleBuilder::new(desired.family, &desired.name);
    for chain in &desired.chains {
        let Some(l) = live.chains.iter().find(|l| l.name == chain.name) else {
            out.push(Difference::ChainMissing {
                chain: chain.name.clone(),
            });
            continue;
        };
        let want = chain.base.map(|b| b.to_string()).unwrap_or_default();
        if l.definition != want {
            out.push(Difference::ChainDefinition {
                chain: chain.name.clone(),
                live: l.definition.clone(),
                want,
            });
        }
        let wanted: Vec<(String, String)> = chain
            .rules
            .iter()
            .map(|r| (builder.text(r), r.to_string()))
            .collect();
        diff_rules(&chain.name, &wanted, &l.rules, &mut out);
    }
    for l in &live.chains {
        if !desired.chains.iter().any(|c| c.name == l.name) {
            out.push(Difference::ChainUnexpected {
                chain: l.name.clone(),
            });
        }
    }
    out
}

/// Aligns the two rule lists on their longest common subsequence, then reports each gap: a
/// live rule where another was wanted "differs", the rest is missing or unexpected.
fn diff_rules(
    chain: &str,
    want: &[(String, String)],
    live: &[LiveRule],
    out: &mut Vec<Difference>,
) {
    let (n, m) = (want.len(), live.len());
    // lcs[i][j]: common subsequence length of want[i..] and live[j..].
    let mut lcs = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            lcs[i][j] = if want[i].0 == live[j].expressions {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j) = (0, 0);
    let (mut missing, mut unexpected) = (Vec::new(), Vec::new());
    let mut flush = |missing: &mut Vec<usize>, unexpected: &mut Vec<usize>| {
        let pairs = missing.len().min(unexpected.len());
        for (&w, &l) in missing.iter().zip(unexpected.iter()) {
            out.push(Difference::RuleDiffers {
                chain: chain.to_owned(),
                position: w + 1,
                live: live[l].to_string(),
                want: want[w].1.clone(),
            });
        }
        for &w in &missing[pairs..] {
            out.push(Difference::RuleMissing {
                chain: chain.to_owned(),
                position: w + 1,
                want: want[w].1.clone(),
            });
        }
        for &l in &unexpected[pairs..] {
            out.push(Difference::RuleUnexpected {
                chain: chain.to_owned(),
                position: l + 1,
                live: live[l].to_string(),
            });
        }
        missing.clear();
        unexpected.clear();
    };
    while i < n || j < m {
        if i < n && j < m && want[i].0 == live[j].expressions {
            flush(&mut missing, &mut unexpected);
            i += 1;
            j += 1;
        } else if j < m && (i == n || lcs[i][j + 1] >= lcs[i + 1][j]) {
            unexpected.push(j);
            j += 1;
        } else {
            missing.push(i);
            i += 1;
        }
    }
    flush(&mut missing, &mut unexpected);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netfilter::live::{LiveChain, LiveSet};
    use crate::netfilter::model::*;

    fn table() -> Table {
        let rule = |m: Match| Rule {
            matches: vec![Match::CtState(CtState::NEW), m],
            statements: vec![Statement::CtMark { mask: 1, value: 1 }],
        };
        Table {
            family: Family::Inet,
            name: "slurm_egress".into(),
            sets: vec![
                Set::new("users", KeyType::Uid, [1001, 1002]),
                Set::new("groups", KeyType::Gid, [2000]),
            ],
            chains: vec![
                Chain {
                    name: "output".into(),
                    base: Some(BaseChain {
                        kind: ChainKind::Route,
                        hook: Hook::Output,
                        priority: BaseChain::PRIORITY_MANGLE,
                        policy: Policy::Accept,
                    }),
                    rules: vec![Rule {
                        matches: vec![Match::L4Proto(vec![6])],
                        statements: vec![Statement::Jump("select".into())],
                    }],
                },
                Chain {
                    name: "select".into(),
                    base: None,
                    rules: vec![
                        rule(Match::SkUidIn("users".into())),
                        rule(Match::SkGidIn("groups".into())),
                        Rule {
                            matches: vec![Match::CtMark { mask: 1, value: 1 }],
                            statements: vec![Statement::MetaMark { mask: 1, value: 1 }],
                        },
                    ],
                },
            ],
        }
    }

    /// What `read` returns for a kernel that has exactly `t`.
    fn live(t: &Table) -> LiveTable {
        let mut builder = RuleBuilder::new(t.family, &t.name);
        LiveTable {
            family: t.family,
            name: t.name.clone(),
            flags: 0,
            sets: t
                .sets
                .iter()
                .map(|s| LiveSet {
                    name: s.name.clone(),
                    key: Some(s.key),
                    definition: s.definition(),
                    elements: s.elements.clone(),
                })
                .collect(),
            chains: t
                .chains
                .iter()
                .map(|c| LiveChain {
                    name: c.name.clone(),
                    definition: c.base.map(|b| b.to_string()).unwrap_or_default(),
                    rules: c
                        .rules
                        .iter()
                        .enumerate()
                        .map(|(i, r)| LiveRule {
                            handle: i as u64 + 1,
                            expressions: builder.text(r),
                            rule: Some(r.clone()),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn lines(desired: &Table, live: Option<&LiveTable>) -> Vec<String> {
        diff(desired, live)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn in_sync_and_missing() {
        let t = table();
        assert_eq!(diff(&t, Some(&live(&t))), []);
        assert_eq!(lines(&t, None), ["table inet slurm_egress is missing"]);
    }

    #[test]
    fn elements_are_not_structural() {
        let t = table();
        let mut l = live(&t);
        l.sets[0].elements.remove(&1001);
        l.sets[0].elements.insert(42);
        let d = diff(&t, Some(&l));
        assert_eq!(
            d.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "set users: element 1001 missing",
                "set users: unexpected element 42"
            ]
        );
        assert!(!d.iter().any(Difference::is_structural));
    }

    #[test]
    fn sets_chains_and_flags() {
        let t = table();
        let mut l = live(&t);
        l.flags = 1;
        l.sets[1].definition = "type uid".into();
        l.sets[1].key = Some(KeyType::Uid);
        l.sets.push(LiveSet {
            name: "extra".into(),
            key: None,
            definition: "type #12 (key length 1, flags 0x0)".into(),
            elements: Default::default(),
        });
        l.sets.remove(0);
        l.chains[0].definition = l.chains[0].definition.replace("accept", "drop");
        l.chains[1].name = "other".into();
        let d = diff(&t, Some(&l));
        assert_eq!(
            d.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "table has flags 0x1 (want none)",
                "set users is missing",
                "set groups: live \"type uid\" want \"type gid\"",
                "unexpected set extra",
                "chain output: live \"type route hook output priority mangle; policy drop;\" \
                 want \"type route hook output priority mangle; policy accept;\"",
                "chain select is missing",
                "unexpected chain other",
            ]
        );
        assert!(d.iter().all(Difference::is_structural));
    }

    #[test]
    fn a_missing_rule_is_named_once() {
        let t = table();
        let mut l = live(&t);
        l.chains[1].rules.remove(0);
        assert_eq!(
            lines(&t, Some(&l)),
            [
                "chain select: rule 1 missing: want \"ct state new meta skuid @users \
              ct mark set ct mark & 0xfffffffe | 0x00000001\""
            ]
        );
    }

    #[test]
    fn changed_and_extra_rules() {
        let t = table();
        let mut l = live(&t);
        l.chains[1].rules[1] = LiveRule {
            handle: 9,
            expressions: "[ counter ]".into(),
            rule: None,
        };
        l.chains[0].rules.push(LiveRule {
            handle: 10,
            expressions: "[ immediate reg 0 drop ]".into(),
            rule: Some(Rule {
                matches: vec![],
                statements: vec![Statement::Drop],
            }),
        });
        assert_eq!(
            lines(&t, Some(&l)),
            [
                "chain output: unexpected rule 2: \"drop\"",
                "chain select: rule 2 differs: live \"[ counter ]\" want \"ct state new \
                 meta skgid @groups ct mark set ct mark & 0xfffffffe | 0x00000001\"",
            ]
        );
    }

    #[test]
    fn rule_texts_are_exact_and_order_insensitive_for_sets() {
        let mut b = RuleBuilder::new(Family::Inet, "t");
        let l4 = |p: Vec<u8>| Rule {
            matches: vec![Match::L4Proto(p)],
            statements: vec![Statement::Accept],
        };
        assert_eq!(b.text(&l4(vec![17, 6])), b.text(&l4(vec![6, 17])));
        assert_ne!(b.text(&l4(vec![6])), b.text(&l4(vec![17])));
        assert_eq!(
            b.text(&l4(vec![6])),
            "[ meta load l4proto => reg 1 ] [ cmp eq reg 1 0x00000006 ] [ immediate reg 0 accept ]"
        );
        assert_eq!(
            b.text(&l4(vec![6, 17])),
            "[ meta load l4proto => reg 1 ] [ lookup reg 1 set { type 12 len 1 flags 0x3: 06 11 } ] \
             [ immediate reg 0 accept ]"
        );
    }
}
