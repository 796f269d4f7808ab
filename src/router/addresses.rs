//! Taking away the floating addresses a killed keepalived left behind.

use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use std::net::{IpAddr, Ipv4Addr};

use super::Error;

fn netlink_error(action: String, e: rtnetlink::Error) -> Error {
    let source = match e {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io(),
        other => std::io::Error::other(other.to_string()),
    };
    Error::Netlink { action, source }
}

fn errno_of(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(msg) => Some(-msg.raw_code()),
        _ => None,
    }
}

/// Deletes each `address/32` from its interface where it is; a line per deletion. An
/// interface that does not exist has nothing to release.
pub async fn release(targets: &[(&str, Ipv4Addr)]) -> Result<Vec<String>, Error> {
    let (connection, handle, _) = rtnetlink::new_connection().map_err(|source| Error::Netlink {
        action: "open a route netlink socket".into(),
        source,
    })?;
    tokio::spawn(connection);
    let mut done = Vec::new();
    for (interface, address) in targets {
        let mut links = handle
            .link()
            .get()
            .match_name(interface.to_string())
            .execute();
        let index = match links.try_next().await {
            Ok(Some(link)) => link.header.index,
            Ok(None) => continue,
            Err(e) if errno_of(&e) == Some(libc::ENODEV) => continue,
            Err(e) => return Err(netlink_error(format!("look up interface {interface}"), e)),
        };
        let mut dump = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        let mut found = Vec::new();
        while let Some(message) = dump
            .try_next()
            .await
            .map_err(|e| netlink_error(format!("list addresses of {interface}"), e))?
        {
            let local = message
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Local(IpAddr::V4(ip)) if ip == address));
            if message.header.index == index && message.header.prefix_len == 32 && local {
                found.push(message);
            }
        }
        for message in found {
            match handle.address().del(message).execute().await {
                Ok(()) => done.push(format!("deleted {address}/32 from {interface}")),
                Err(e) if errno_of(&e) == Some(libc::EADDRNOTAVAIL) => {}
                Err(e) => {
                    return Err(netlink_error(
                        format!("delete {address}/32 from {interface}"),
                        e,
                    ));
                }
            }
        }
    }
    Ok(done)
}
