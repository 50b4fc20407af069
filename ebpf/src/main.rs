//! strait's eBPF programs.
//!
//! `pod_ingress` runs at TC ingress on the host-side veth of every enrolled pod: it sees each
//! packet the pod sends and hands new outbound TCP connections to the node proxy's transparent
//! listener with `bpf_sk_assign` (CAP-1), so the proxy accepts them with the original destination
//! as its local address. Later packets of a flow go to the socket that owns it. Which pods are
//! captured is decided by the `POD_STATE` map that the proxy keeps in sync with its model.
//!
//! `uplink_ingress` runs at TC ingress on the node's uplink: HBONE (TCP to port 15008) for a
//! captured pod of this node is handed to the proxy's HBONE listener (CAP-2), since the pod
//! itself does not listen there.
#![no_std]
#![no_main]

use core::{ffi::c_void, mem, ptr};

use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_F_CURRENT_NETNS, BPF_TCP_LISTEN, TC_ACT_SHOT, bpf_sock, bpf_sock_tuple, tcx_action_base::TCX_NEXT},
    helpers::{bpf_map_lookup_elem, bpf_sk_assign, bpf_sk_release, bpf_skc_lookup_tcp},
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray, SockMap},
    programs::TcContext,
};
use strait_ebpf_common::{
    HBONE_PORT, LISTENER_HBONE, LISTENER_OUTBOUND, LISTENER_SLOTS, POD_CAPTURED, POD_DRAINING, PROXY_MARK, STEER_MARK,
    stat,
};

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_TCP: u8 = 6;
const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;

/// Pods this node captures, keyed by IPv4 address in network byte order; values are
/// `POD_CAPTURED` or `POD_DRAINING`.
#[map]
static POD_STATE: HashMap<u32, u8> = HashMap::with_max_entries(4096, 0);

/// The proxy's listening sockets, by `LISTENER_*` slot.
#[map]
static LISTENERS: SockMap = SockMap::with_max_entries(LISTENER_SLOTS, 0);

/// Counters, indexed by `stat::*`; per CPU so the hot path never contends on a cache line.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[inline(always)]
fn bump(idx: u32) {
    if let Some(p) = STATS.get_ptr_mut(idx) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

/// The parts of an IPv4/TCP packet the capture decision needs. Addresses and ports stay in
/// network byte order, as `bpf_sock_tuple` wants them.
struct TcpPacket {
    saddr: u32,
    daddr: u32,
    sport: u16,
    dport: u16,
    flags: u8,
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

#[classifier]
pub fn pod_ingress(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is the live __sk_buff of this invocation.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark == PROXY_MARK {
        bump(stat::PROXY_MARKED);
        return TCX_NEXT;
    }
    let Some(pkt) = parse_tcp(&ctx) else {
        return TCX_NEXT;
    };
    // SAFETY: plain lookup; the value is copied out before the map can change.
    let Some(state) = (unsafe { POD_STATE.get(&pkt.saddr) }).copied() else {
        return TCX_NEXT;
    };
    bump(stat::POD_PACKETS);

    // Packets of a flow the proxy already holds (its accepted socket for an outbound
    // connection, or its upstream socket when it dials a pod on this node) go to that socket.
    // This runs for draining pods too, which is what keeps their open connections alive.
    if let Some(verdict) = assign_established(&ctx, &pkt) {
        return verdict;
    }

    let is_new = pkt.flags & TCP_FLAG_SYN != 0 && pkt.flags & TCP_FLAG_ACK == 0;
    if !is_new {
        return TCX_NEXT;
    }
    match state {
        POD_CAPTURED => assign_listener(&ctx, LISTENER_OUTBOUND, stat::OUTBOUND_NEW),
        POD_DRAINING => {
            bump(stat::DRAINING_PASSED);
            TCX_NEXT
        }
        _ => TCX_NEXT,
    }
}

#[classifier]
pub fn uplink_ingress(ctx: TcContext) -> i32 {
    // SAFETY: the context pointer is the live __sk_buff of this invocation.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark == PROXY_MARK {
        bump(stat::PROXY_MARKED);
        return TCX_NEXT;
    }
    let Some(pkt) = parse_tcp(&ctx) else {
        return TCX_NEXT;
    };
    if u16::from_be(pkt.dport) != HBONE_PORT {
        return TCX_NEXT;
    }
    // SAFETY: plain lookup; the value is copied out before the map can change.
    let Some(state) = (unsafe { POD_STATE.get(&pkt.daddr) }).copied() else {
        return TCX_NEXT;
    };
    if let Some(verdict) = assign_established(&ctx, &pkt) {
        return verdict;
    }
    let is_new = pkt.flags & TCP_FLAG_SYN != 0 && pkt.flags & TCP_FLAG_ACK == 0;
    if is_new && state == POD_CAPTURED {
        return assign_listener(&ctx, LISTENER_HBONE, stat::INBOUND_HBONE_NEW);
    }
    TCX_NEXT
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
    let listening = unsafe { (*sk).state } == BPF_TCP_LISTEN;
    if listening {
        // A listener on the destination port is not this flow's socket.
        unsafe { bpf_sk_release(sk.cast()) };
        return None;
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

/// Hands a new connection to one of the proxy's listeners; drops it if the proxy has none
/// registered, so an enrolled pod's traffic never bypasses the mesh (fail closed, CAP-6).
#[inline(always)]
fn assign_listener(ctx: &TcContext, slot: u32, counter: u32) -> i32 {
    // SAFETY: sockmap lookup from a TC program returns a referenced socket or null.
    let sk = unsafe {
        bpf_map_lookup_elem(ptr::addr_of!(LISTENERS).cast_mut().cast::<c_void>(), ptr::addr_of!(slot).cast::<c_void>())
    }
    .cast::<bpf_sock>();
    if sk.is_null() {
        bump(stat::NO_LISTENER);
        return TC_ACT_SHOT as i32;
    }
    // SAFETY: sk is non-null and referenced until released.
    if unsafe { (*sk).state } != BPF_TCP_LISTEN {
        unsafe { bpf_sk_release(sk.cast()) };
        bump(stat::NO_LISTENER);
        return TC_ACT_SHOT as i32;
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

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
