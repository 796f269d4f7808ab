//! The router's own nftables table: what may be forwarded, and the NAT.

use crate::config;
use crate::netfilter::{
    BaseChain, Chain, ChainKind, CtState, Family, Hook, Match, Policy, Rule, Statement, Table,
};

/// The nftables table this project owns on a router.
pub const TABLE: &str = "slurm_egress_router";

fn rule(matches: Vec<Match>, statements: Vec<Statement>) -> Rule {
    Rule {
        matches,
        statements,
    }
}

fn base(kind: ChainKind, hook: Hook, priority: i32, policy: Policy) -> Option<BaseChain> {
    Some(BaseChain {
        kind,
        hook,
        priority,
        policy,
    })
}

/// The router's table for this config:
///
/// - `forward` (policy drop): new and ongoing connections from inside to outside, and only the
///   answers (`ct state established,related`) back in. Nothing else is forwarded, between any
///   interfaces. Untracked ("invalid") packets are dropped first: NAT needs a connection, and
///   without one a packet would leave with the worker's private source address.
/// - `postrouting`: what goes from inside to outside is SNATed to `public_ip`, or masqueraded.
///   Only forwarded packets (`iifname` inside): the router's own traffic keeps its address,
///   which matters on a backup, where `public_ip` is not even local.
/// - `input`, only with `public_ip`: nothing may open a connection to `public_ip`. It serves
///   only as the source of forwarded connections; a packet for it that conntrack does not know
///   is a reply that arrived at a new master before the synchronised state was committed, and
///   dropping it (the sender retransmits) is what keeps the kernel from answering with a reset
///   that would kill the connection.
pub fn table(r: &config::Router) -> Table {
    let (inside, outside) = (r.inside.value.clone(), r.outside.value.clone());
    let mut chains = vec![Chain {
        name: "forward".into(),
        base: base(
            ChainKind::Filter,
            Hook::Forward,
            BaseChain::PRIORITY_FILTER,
            Policy::Drop,
        ),
        rules: vec![
            rule(
                vec![Match::CtState(CtState::INVALID)],
                vec![Statement::Counter, Statement::Drop],
            ),
            rule(
                vec![
                    Match::IifName(inside.clone()),
                    Match::OifName(outside.clone()),
                ],
                vec![Statement::Counter, Statement::Accept],
            ),
            rule(
                vec![
                    Match::IifName(outside.clone()),
                    Match::OifName(inside.clone()),
                    Match::CtState(CtState::ESTABLISHED | CtState::RELATED),
                ],
                vec![Statement::Counter, Statement::Accept],
            ),
        ],
    }];
    let nat = match &r.public_ip {
        Some(public) => Statement::Snat(public.value),
        None => Statement::Masquerade,
    };
    chains.push(Chain {
        name: "postrouting".into(),
        base: base(
            ChainKind::Nat,
            Hook::Postrouting,
            BaseChain::PRIORITY_SRCNAT,
            Policy::Accept,
        ),
        rules: vec![rule(
            vec![Match::IifName(inside), Match::OifName(outside.clone())],
            vec![nat],
        )],
    });
    if let Some(public) = &r.public_ip {
        chains.push(Chain {
            name: "input".into(),
            base: base(
                ChainKind::Filter,
                Hook::Input,
                BaseChain::PRIORITY_FILTER,
                Policy::Accept,
            ),
            rules: vec![rule(
                vec![
                    Match::IifName(outside),
                    Match::IpDaddr(public.value),
                    Match::CtState(CtState::NEW),
                ],
                vec![Statement::Counter, Statement::Drop],
            )],
        });
    }
    Table {
        family: Family::Inet,
        name: TABLE.into(),
        sets: vec![],
        chains,
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{TOML, config};
    use super::*;

    #[test]
    fn floating_public_address() {
        let c = config(TOML);
        assert_eq!(
            table(c.router.as_ref().unwrap()).to_string(),
            r#"table inet slurm_egress_router {
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state invalid counter drop
		iifname "ib0" oifname "eth9" counter accept
		iifname "eth9" oifname "ib0" ct state established,related counter accept
	}

	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		iifname "ib0" oifname "eth9" snat ip to 140.181.2.227
	}

	chain input {
		type filter hook input priority filter; policy accept;
		iifname "eth9" ip daddr 140.181.2.227 ct state new counter drop
	}
}"#
        );
    }

    #[test]
    fn masquerade_without_a_public_address() {
        let c = config(&TOML.replace("public_ip = \"140.181.2.227\"\n", ""));
        let t = table(c.router.as_ref().unwrap());
        let text = t.to_string();
        assert!(
            text.contains("\t\tiifname \"ib0\" oifname \"eth9\" masquerade\n"),
            "{text}"
        );
        assert!(!text.contains("chain input"), "{text}");
        assert_eq!(t.chains.len(), 2);
    }
}
