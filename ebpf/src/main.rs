//! strait's eBPF programs.
//!
//! - `pod_ingress`, at TC ingress on the host-side veth of every pod of the node, sees each
//!   packet a pod sends. A captured pod's new connections go to the outbound listener (CAP-1);
//!   a connection *to* a captured pod from a pod outside the mesh goes to the inbound listeners
//!   (HBONE on 15008, anything else to the plaintext listener where PeerAuthentication decides).
//! - `uplink_ingress`, at TC ingress on the node's uplink, does the same for connections to
//!   captured pods arriving from other nodes (CAP-2).
//! - `uplink_guard`, XDP on the uplink, drops before any allocation what policy already denies
//!   without needing an identity: plaintext to a STRICT pod, and sources a DENY policy names by
//!   address and port (CAP-4). The peers' answers on the HBONE connections the proxy opened
//!   from a captured pod's address (from port 15008, to a socket the node holds) pass.
//!
//! Later packets of every steered flow go to the socket that owns it (`bpf_skc_lookup_tcp`),
//! including a pod's replies to connections the proxy opened from the client's own address,
//! and the answers to the HBONE connections it opened from a client pod's address (L4-6). All
//! decisions come from maps the proxy keeps in step with its model; maps and programs are pinned
//! so a proxy restart changes nothing for traffic (CAP-6).
#![no_std]
#![no_main]

use core::{ffi::c_void, mem, ptr};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, BPF_TCP_TIME_WAIT, TC_ACT_SHOT, bpf_sock, bpf_sock_tuple, sk_action,
        tcx_action_base::TCX_NEXT, xdp_action,
    },
    helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{classifier, map, sk_lookup, xdp},
    maps::{HashMap, LpmTrie, PerCpuArray, SockMap, lpm_trie::Key},
    programs::{SkLookupContext, TcContext, XdpContext},
};
use strait_ebpf_common::{
    DENY_KEY_FIXED_BITS, DenyKeyData, HBONE_PORT, LISTENER_HBONE, LISTENER_INBOUND_PLAINTEXT, LISTENER_OUTBOUND,
    LISTENER_SLOTS, MTLS_STRICT, POD_CAPTURED, POD_DRAINING, POD_STRICT, PROXY_MARK, PortKey, STEER_MARK, stat,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// Pods of this node in the mesh, by IPv4 address (network byte order): `POD_*` flags.
#[map]
static POD_STATE: HashMap<u32, u8> = HashMap::pinned(4096, 0);

/// Port-level PeerAuthentication modes that override a pod's (`MTLS_*`).
#[map]
static PORT_MTLS: HashMap<PortKey, u8> = HashMap::pinned(4096, 0);

/// Sources denied by DENY policies that need no identity, keyed by destination pod, port (0 =
/// any) and source prefix.
#[map]
static DENY_SOURCES: LpmTrie<DenyKeyData, u8> = LpmTrie::pinned(16384, 0);

/// The proxy's listening sockets, by `LISTENER_*` slot.
#[map]
static LISTENERS: SockMap = SockMap::pinned(LISTENER_SLOTS, 0);

/// Pod veths that are ports of a bridge (bridge CNIs), by interface index: the bridge's MAC.
/// A packet steered to the proxy from such a port is re-addressed to the bridge, or the bridge
/// would switch a packet for a pod of the same bridge straight to that pod's port and the
/// socket assignment would never be seen (CAP-1).
#[map]
static BRIDGE_PORTS: HashMap<u32, [u8; 6]> = HashMap::pinned(4096, 0);

/// Counters, indexed by `stat::*`; per CPU so the hot path never contends on a cache line.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stat::COUNT, 0);

#[inline(always)]
fn bump(idx: u32) {
    if let Some(p) = STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

/// The parts of an IPv4/TCP packet the decisions need. Addresses and ports stay in network
/// byte order, as `bpf_sock_tuple` and the map keys want them.
struct TcpPacket {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    flags: u8,
}

impl TcpPacket {
    fn is_syn(&self) -> bool {
        self.flags & TCP_FLAG_SYN != 0 && self.flags & TCP_FLAG_ACK == 0
    }
}

#[inline(always)]
fn parse_tcp(ctx: &TcContext) -> Option<TcpPacket> {
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    if ethertype != ETH_P_IP {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_HLEN).ok()?;
    if ctx.load::<u8>(ETH_HLEN + 9).ok()? != IPPROTO_TCP {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if ihl < 20 {
        return None;
    }
    Some(TcpPacket {
        saddr: ctx.load(ETH_HLEN + 12).ok()?,
        daddr: ctx.load(ETH_HLEN + 16).ok()?,
        sport: ctx.load(ETH_HLEN + ihl).ok()?,
        dport: ctx.load(ETH_HLEN + ihl + 2).ok()?,
        flags: ctx.load(ETH_HLEN + ihl + 13).ok()?,
    })
}

#[inline(always)]
fn marked_by_proxy(ctx: &TcContext) -> bool {
    // SAFETY: the context pointer is the live __sk_buff of this invocation.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark == PROXY_MARK {
        bump(stat::PROXY_MARKED);
        return true;
    }
    false
}

#[inline(always)]
fn pod_state(ip: u32) -> Option<u8> {
    // SAFETY: plain lookup; the value is copied out before the map can change.
    unsafe { POD_STATE.get(&ip) }.copied()
}

#[classifier]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    let verdict = pod_ingress_verdict(&ctx);
    if verdict == TCX_NEXT && steered(&ctx) {
        to_bridge(&ctx);
    }
    verdict
}

#[inline(always)]
fn steered(ctx: &TcContext) -> bool {
    // SAFETY: the context pointer is the live __sk_buff of this invocation.
    unsafe { (*ctx.skb.skb).mark == STEER_MARK }
}

/// On a bridge port, addresses a steered packet to the bridge itself so that it goes up the
/// node's stack, where the assigned socket takes it.
#[inline(always)]
fn to_bridge(ctx: &TcContext) {
    // SAFETY: the context pointer is the live __sk_buff of this invocation.
    let index = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: plain lookup; the value is copied out before the map can change.
    if let Some(mac) = unsafe { BRIDGE_PORTS.get(&index) }.copied()
        && ctx.store(0, &mac, 0).is_err()
    {
        bump(stat::ASSIGN_ERRORS);
    }
}

#[inline(always)]
fn pod_ingress_verdict(ctx: &TcContext) -> i32 {
    if marked_by_proxy(ctx) {
        return TCX_NEXT;
    }
    let Some(pkt) = parse_tcp(ctx) else {
        return TCX_NEXT;
    };
    if let Some(state) = pod_state(pkt.saddr) {
        bump(stat::POD_PACKETS);
        // Flows the proxy holds: the pod's captured connections, and its replies to the
        // connections the proxy opened to it. Draining pods keep theirs this way (CAP-5).
        if let Some(verdict) = assign_established(ctx, &pkt) {
            return verdict;
        }
        if !pkt.is_syn() {
            return TCX_NEXT;
        }
        if state & POD_CAPTURED != 0 {
            return assign_listener(ctx, LISTENER_OUTBOUND, stat::OUTBOUND_NEW, state);
        }
        if state & POD_DRAINING != 0 {
            bump(stat::DRAINING_PASSED);
        }
        return TCX_NEXT;
    }
    // A pod outside the mesh calling a captured pod of this node.
    inbound(ctx, &pkt)
}

#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    if marked_by_proxy(&ctx) {
        return TCX_NEXT;
    }
    let Some(pkt) = parse_tcp(&ctx) else {
        return TCX_NEXT;
    };
    inbound(&ctx, &pkt)
}

/// A packet addressed to a captured pod of this node: its flow's socket if the proxy holds
/// it, else a new connection for the HBONE or the plaintext listener.
#[inline(always)]
fn inbound(ctx: &TcContext, pkt: &TcpPacket) -> i32 {
    let Some(state) = pod_state(pkt.daddr) else {
        return TCX_NEXT;
    };
    if let Some(verdict) = assign_established(ctx, pkt) {
        if verdict == TCX_NEXT && u16::from_be(pkt.sport) == HBONE_PORT {
            // A peer's answer on a tunnel the proxy opened from this pod's address (L4-6).
            bump(stat::HBONE_CLIENT_REPLY);
        }
        return verdict;
    }
    if !pkt.is_syn() || state & POD_CAPTURED == 0 {
        return TCX_NEXT;
    }
    if u16::from_be(pkt.dport) == HBONE_PORT {
        assign_listener(ctx, LISTENER_HBONE, stat::INBOUND_HBONE_NEW, state)
    } else if denied_source(pkt.daddr, pkt.dport, pkt.saddr) {
        bump(stat::TC_DROP_DENY_POLICY);
        TC_ACT_SHOT as i32
    } else {
        assign_listener(ctx, LISTENER_INBOUND_PLAINTEXT, stat::INBOUND_PLAINTEXT_NEW, state)
    }
}

/// Whether a DENY policy names this source for this pod and port (or any port).
#[inline(always)]
fn denied_source(daddr: u32, dport: u16, saddr: u32) -> bool {
    for port in [dport, 0] {
        let mut data: DenyKeyData = [0; 10];
        data[..4].copy_from_slice(&daddr.to_ne_bytes());
        data[4..6].copy_from_slice(&port.to_ne_bytes());
        data[6..].copy_from_slice(&saddr.to_ne_bytes());
        if DENY_SOURCES.get(Key::new(DENY_KEY_FIXED_BITS + 32, data)).is_some() {
            return true;
        }
    }
    false
}

/// Hands the packet to the established (or half-open) socket of its 4-tuple, if one exists.
#[inline(always)]
fn assign_established(ctx: &TcContext, pkt: &TcpPacket) -> Option<i32> {
    // SAFETY: an all-zero bpf_sock_tuple is a valid value; the ipv4 arm is filled below.
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = pkt.saddr;
    tuple.__bindgen_anon_1.ipv4.daddr = pkt.daddr;
    tuple.__bindgen_anon_1.ipv4.sport = pkt.sport;
    tuple.__bindgen_anon_1.ipv4.dport = pkt.dport;
    let tuple_len = mem::size_of::<[u32; 3]>() as u32; // sizeof(tuple->ipv4)
    // SAFETY: helper call with a valid context and tuple; the result is released below.
    let sk = unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), &mut tuple, tuple_len, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return None;
    }
    // SAFETY: sk is a non-null socket reference returned by the lookup helper.
    let state = unsafe { (*sk).state };
    if state == BPF_TCP_LISTEN {
        // A listener on the destination port is not this flow's socket.
        // SAFETY: releasing the reference the lookup took.
        unsafe { bpf_sk_release(sk.cast()) };
        return None;
    }
    if state == BPF_TCP_TIME_WAIT && pkt.is_syn() {
        // A new connection reusing the ports of one the proxy closed. The TIME_WAIT socket
        // must see it: the kernel retires it and asks for a listener (`steer_lookup` names the
        // proxy's). Handed straight to the listener instead, the SYN would be dropped as a
        // duplicate of the TIME_WAIT.
        bump(stat::TIME_WAIT_SYN);
    }
    ctx.skb.set_mark(STEER_MARK);
    // SAFETY: assign then release the reference we hold.
    let ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk.cast(), 0) };
    unsafe { bpf_sk_release(sk.cast()) };
    if ret != 0 {
        bump(stat::ASSIGN_ERRORS);
        return Some(TC_ACT_SHOT as i32);
    }
    bump(stat::ESTABLISHED);
    Some(TCX_NEXT)
}

/// Hands a new connection to one of the proxy's listeners. Without one (the proxy is down),
/// a STRICT pod's connection is dropped, never let past the mesh; others pass (CAP-6).
#[inline(always)]
fn assign_listener(ctx: &TcContext, slot: u32, counter: u32, state: u8) -> i32 {
    // SAFETY: sockmap lookup from a TC program returns a referenced socket or null.
    let sk = unsafe {
        bpf_map_lookup_elem(ptr::addr_of!(LISTENERS).cast_mut().cast::<c_void>(), ptr::addr_of!(slot).cast::<c_void>())
    }
    .cast::<bpf_sock>();
    if sk.is_null() {
        return no_listener(state);
    }
    // SAFETY: sk is non-null and referenced until released.
    if unsafe { (*sk).state } != BPF_TCP_LISTEN {
        unsafe { bpf_sk_release(sk.cast()) };
        return no_listener(state);
    }
    ctx.skb.set_mark(STEER_MARK);
    let ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk.cast(), 0) };
    unsafe { bpf_sk_release(sk.cast()) };
    if ret != 0 {
        bump(stat::ASSIGN_ERRORS);
        return TC_ACT_SHOT as i32;
    }
    bump(counter);
    TCX_NEXT
}

#[inline(always)]
fn no_listener(state: u8) -> i32 {
    if state & POD_STRICT != 0 {
        bump(stat::NO_LISTENER);
        TC_ACT_SHOT as i32
    } else {
        bump(stat::NO_LISTENER_PASSED);
        TCX_NEXT
    }
}

/// The kernel's listener lookup in the node's network namespace (`BPF_SK_LOOKUP`), for packets
/// the classifiers steered to this host but assigned to no socket: a SYN that met the TIME_WAIT
/// of an earlier connection with the same ports, which the kernel retires only if a listener
/// takes the new connection. Names the proxy's listener as the classifiers would have;
/// anything not about a captured pod is left to the usual lookup.
#[sk_lookup]
pub fn steer_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the context pointer is the live bpf_sk_lookup of this invocation.
    let (protocol, remote, local, local_port) = unsafe {
        let l = &*ctx.lookup;
        (l.protocol, l.remote_ip4, l.local_ip4, l.local_port)
    };
    if protocol != u32::from(IPPROTO_TCP) {
        return sk_action::SK_PASS;
    }
    let captured = |ip| pod_state(ip).is_some_and(|s| s & POD_CAPTURED != 0);
    let slot = if captured(remote) {
        LISTENER_OUTBOUND
    } else if captured(local) {
        if local_port == u32::from(HBONE_PORT) { LISTENER_HBONE } else { LISTENER_INBOUND_PLAINTEXT }
    } else {
        return sk_action::SK_PASS;
    };
    // SAFETY: sockmap lookup returns a referenced socket or null.
    let sk = unsafe {
        bpf_map_lookup_elem(ptr::addr_of!(LISTENERS).cast_mut().cast::<c_void>(), ptr::addr_of!(slot).cast::<c_void>())
    };
    if sk.is_null() {
        return sk_action::SK_PASS;
    }
    // SAFETY: assign then release the reference we hold.
    let ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk, 0) };
    unsafe { bpf_sk_release(sk) };
    if ret == 0 {
        bump(stat::LOOKUP_ASSIGNED);
    }
    sk_action::SK_PASS
}

#[xdp]
pub fn uplink_guard(ctx: XdpContext) -> u32 {
    match guard(&ctx) {
        Some(verdict) => verdict,
        None => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn xdp_load<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let start = ctx.data();
    if start + offset + mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: bounds checked against data_end just above, as the verifier requires.
    Some(unsafe { ptr::read_unaligned((start + offset) as *const T) })
}

fn guard(ctx: &XdpContext) -> Option<u32> {
    if u16::from_be(xdp_load::<u16>(ctx, 12)?) != ETH_P_IP {
        return None;
    }
    let vihl: u8 = xdp_load(ctx, ETH_HLEN)?;
    if xdp_load::<u8>(ctx, ETH_HLEN + 9)? != IPPROTO_TCP {
        return None;
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    let saddr: u32 = xdp_load(ctx, ETH_HLEN + 12)?;
    let daddr: u32 = xdp_load(ctx, ETH_HLEN + 16)?;
    let sport: u16 = xdp_load(ctx, ETH_HLEN + ihl)?;
    let dport: u16 = xdp_load(ctx, ETH_HLEN + ihl + 2)?;
    let state = pod_state(daddr)?;
    if state & POD_CAPTURED == 0 || u16::from_be(dport) == HBONE_PORT {
        // HBONE carries the real client inside TLS: the proxy decides on it.
        return None;
    }
    let port_key = PortKey { ip: daddr, port: dport, _pad: 0 };
    // SAFETY: plain lookup, value copied out.
    let strict = match unsafe { PORT_MTLS.get(&port_key) }.copied() {
        Some(mode) => mode == MTLS_STRICT,
        None => state & POD_STRICT != 0,
    };
    let drop = if strict {
        stat::XDP_DROP_STRICT_PLAINTEXT
    } else if denied_source(daddr, dport, saddr) {
        stat::XDP_DROP_DENY_POLICY
    } else {
        return None;
    };
    // Only a packet about to be dropped pays for the socket lookup.
    if u16::from_be(sport) == HBONE_PORT && tunnel_reply(ctx, ihl, saddr, daddr, sport, dport)? {
        // The peer's side of an HBONE connection the proxy opened from this pod's address
        // (L4-6): TC hands it to the proxy's socket, never to the pod.
        return None;
    }
    bump(drop);
    Some(xdp_action::XDP_DROP)
}

/// Whether a packet from port 15008 belongs to a connection the proxy opened: not a new
/// connection (SYN without ACK), and the node holds a socket for its 4-tuple that is not a
/// listener (SYN_SENT, established, closing or TIME_WAIT).
///
/// Passing every non-SYN packet from port 15008 would be cheaper and safe today (a captured
/// pod never keeps a connection to port 15008: the outbound path refuses the proxy's ports),
/// but would let anyone off the node send ACKs and data from port 15008 past the guard to any
/// port of a STRICT pod, or past a DENY policy naming them. The lookup only runs for packets
/// from port 15008 that the guard would otherwise drop (TC makes the same lookup right after).
#[inline(always)]
fn tunnel_reply(ctx: &XdpContext, ihl: usize, saddr: u32, daddr: u32, sport: u16, dport: u16) -> Option<bool> {
    let flags: u8 = xdp_load(ctx, ETH_HLEN + ihl + 13)?;
    if flags & TCP_FLAG_SYN != 0 && flags & TCP_FLAG_ACK == 0 {
        return Some(false);
    }
    // SAFETY: an all-zero bpf_sock_tuple is a valid value; the ipv4 arm is filled below.
    let mut tuple: bpf_sock_tuple = unsafe { mem::zeroed() };
    tuple.__bindgen_anon_1.ipv4.saddr = saddr;
    tuple.__bindgen_anon_1.ipv4.daddr = daddr;
    tuple.__bindgen_anon_1.ipv4.sport = sport;
    tuple.__bindgen_anon_1.ipv4.dport = dport;
    let tuple_len = mem::size_of::<[u32; 3]>() as u32; // sizeof(tuple->ipv4)
    // SAFETY: helper call with a valid context and tuple; the result is released below.
    let sk = unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), &mut tuple, tuple_len, BPF_F_CURRENT_NETNS as u64, 0) };
    if sk.is_null() {
        return Some(false);
    }
    // SAFETY: sk is a non-null socket reference returned by the lookup helper; released here.
    let state = unsafe { (*sk).state };
    unsafe { bpf_sk_release(sk.cast()) };
    Some(state != BPF_TCP_LISTEN)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
