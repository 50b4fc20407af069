//! A DNS server for tests: answers A queries over UDP from a fixed table, so that a test can point
//! a process's `/etc/resolv.conf` at it and make names such as `edition.cnn.com` resolve to
//! servers of the topology. Names not in the table get NXDOMAIN; AAAA and other types of a known
//! name get an empty answer (NOERROR), so that getaddrinfo's parallel A/AAAA queries succeed.
//! Every query is logged (`dns query NAME TYPE -> ANSWER`), for tests to see who asked.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, UdpSocket};

/// Seconds a client may cache an answer: short, so that a test changing its table is seen soon.
const TTL: u32 = 1;
const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const NXDOMAIN: u8 = 3;
const FORMERR: u8 = 1;

/// Name (lower case, without the final dot) to its A records.
pub type Table = HashMap<String, Vec<Ipv4Addr>>;

/// Parses `name=ip[,ip...]`.
pub fn parse_record(text: &str) -> Result<(String, Vec<Ipv4Addr>), String> {
    let (name, ips) = text.split_once('=').ok_or_else(|| format!("record {text:?} is not NAME=IP[,IP...]"))?;
    let ips = ips
        .split(',')
        .map(|ip| ip.trim().parse().map_err(|_| format!("bad address {ip:?} in record {text:?}")))
        .collect::<Result<Vec<Ipv4Addr>, String>>()?;
    Ok((name.trim().trim_end_matches('.').to_ascii_lowercase(), ips))
}

/// Serves `table` on UDP `port` (all addresses) until an I/O error.
pub fn serve(port: u16, table: &Table) -> io::Result<()> {
    let socket = UdpSocket::bind(("0.0.0.0", port))?;
    println!("dns serving {} names on udp port {port}", table.len());
    let mut buf = [0u8; 1500];
    loop {
        let (n, peer) = socket.recv_from(&mut buf)?;
        let Some((reply, summary)) = answer(&buf[..n], table) else { continue };
        println!("dns query {summary} from {peer}");
        socket.send_to(&reply, peer)?;
    }
}

/// The reply to one query, and a line describing it; `None` for what is not a query at all.
pub fn answer(query: &[u8], table: &Table) -> Option<(Vec<u8>, String)> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    let question = parse_question(query);
    let mut reply = Vec::with_capacity(512);
    reply.extend_from_slice(&query[..2]);
    // QR, the query's opcode and RD, AA; RA.
    reply.push(0x80 | (query[2] & 0x79) | 0x04);
    let Some((name, qtype, end)) = question else {
        reply.push(0x80 | FORMERR);
        reply.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        return Some((reply, "malformed -> FORMERR".to_owned()));
    };
    let records = table.get(&name);
    let rcode = if records.is_some() { 0 } else { NXDOMAIN };
    let answers: &[Ipv4Addr] = match records {
        Some(ips) if qtype == TYPE_A => ips,
        _ => &[],
    };
    reply.push(0x80 | rcode);
    reply.extend_from_slice(&1u16.to_be_bytes());
    reply.extend_from_slice(&u16::try_from(answers.len()).unwrap_or(0).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(&query[12..end]);
    for ip in answers {
        // The name as a pointer to the question's, at offset 12.
        reply.extend_from_slice(&[0xc0, 0x0c]);
        reply.extend_from_slice(&TYPE_A.to_be_bytes());
        reply.extend_from_slice(&CLASS_IN.to_be_bytes());
        reply.extend_from_slice(&TTL.to_be_bytes());
        reply.extend_from_slice(&4u16.to_be_bytes());
        reply.extend_from_slice(&ip.octets());
    }
    let shown = match (records, answers.is_empty()) {
        (None, _) => "NXDOMAIN".to_owned(),
        (Some(_), true) => "no records".to_owned(),
        (Some(_), false) => answers.iter().map(Ipv4Addr::to_string).collect::<Vec<_>>().join(","),
    };
    Some((reply, format!("{name} type {qtype} -> {shown}")))
}

/// The first question: its name (lower case), type, and the offset just past it.
fn parse_question(query: &[u8]) -> Option<(String, u16, usize)> {
    let mut labels = Vec::new();
    let mut at = 12;
    loop {
        let len = usize::from(*query.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        if len > 63 {
            return None;
        }
        labels.push(String::from_utf8_lossy(query.get(at..at + len)?).to_ascii_lowercase());
        at += len;
    }
    let qtype = u16::from_be_bytes([*query.get(at)?, *query.get(at + 1)?]);
    let end = at + 4;
    (end <= query.len()).then(|| (labels.join("."), qtype, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.') {
            q.push(u8::try_from(label.len()).expect("short label"));
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&CLASS_IN.to_be_bytes());
        q
    }

    #[test]
    fn answers_a_records_from_the_table() {
        let table: Table = [parse_record("Edition.CNN.com=10.9.0.1,10.9.0.2").expect("record")].into();
        let (reply, summary) = answer(&query("edition.cnn.com", TYPE_A), &table).expect("reply");
        assert_eq!(summary, "edition.cnn.com type 1 -> 10.9.0.1,10.9.0.2");
        assert_eq!(&reply[..2], &[0x12, 0x34], "same id");
        assert_eq!(reply[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([reply[6], reply[7]]), 2, "two answers");
        assert_eq!(&reply[reply.len() - 4..], &[10, 9, 0, 2]);

        let (reply, _) = answer(&query("edition.cnn.com", 28), &table).expect("AAAA");
        assert_eq!((reply[3] & 0x0f, reply[7]), (0, 0), "known name, no AAAA: empty NOERROR");
        let (reply, summary) = answer(&query("other.example", TYPE_A), &table).expect("unknown");
        assert_eq!((reply[3] & 0x0f, summary.ends_with("NXDOMAIN")), (NXDOMAIN, true));
        assert!(answer(&[0; 5], &table).is_none());
        assert!(parse_record("x=not-ip").is_err());
    }
}
