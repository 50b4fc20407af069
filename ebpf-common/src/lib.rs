//! Constants and map layouts shared by the eBPF programs (`strait-ebpf`) and the node proxy.
//!
//! Both sides must agree bit for bit, so everything the kernel and userspace exchange is defined
//! here once: socket marks, listener slots, pod states and counter indices.
#![no_std]

/// `SO_MARK` on every socket the node proxy opens. Packets carrying it are never steered, so the
/// proxy's own upstream connections cannot loop back into it (CAP-3).
pub const PROXY_MARK: u32 = 0x539;

/// skb mark the capture program sets on packets it hands to a local socket. `strait node`
/// installs `ip rule fwmark STEER_MARK lookup STEER_TABLE` with `local 0.0.0.0/0 dev lo` in that
/// table, so a packet for a non-local destination is delivered to the assigned socket instead of
/// being forwarded.
pub const STEER_MARK: u32 = 0x5e0;
/// Routing table holding the `local 0.0.0.0/0 dev lo` route for steered packets.
pub const STEER_TABLE: u32 = 150;
/// Priority of the policy-routing rule; below the main table's 32766.
pub const STEER_RULE_PRIORITY: u32 = 1050;

/// Ports of the node proxy's listeners (SPEC conventions).
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;

/// Slots of the `LISTENERS` sockmap.
pub const LISTENER_OUTBOUND: u32 = 0;
pub const LISTENER_INBOUND_PLAINTEXT: u32 = 1;
pub const LISTENER_HBONE: u32 = 2;
pub const LISTENER_SLOTS: u32 = 4;

/// Flags of a pod in the `POD_STATE` map (keyed by the pod's IPv4 address in network byte
/// order). New connections of a `POD_CAPTURED` pod are steered to the outbound listener, and
/// connections to it to the inbound ones.
pub const POD_CAPTURED: u8 = 1;
/// The pod was un-enrolled: its new connections go out untouched, but packets of connections the
/// proxy already holds keep reaching their sockets until they end (CAP-5).
pub const POD_DRAINING: u8 = 2;
/// PeerAuthentication makes the pod STRICT (by default, for ports without their own mode): no
/// plaintext may reach it, and when the proxy is down its traffic is dropped, not let through.
pub const POD_STRICT: u8 = 4;

/// `PORT_MTLS` values: a port-level PeerAuthentication mode that overrides the pod's.
pub const MTLS_STRICT: u8 = 1;
pub const MTLS_PERMISSIVE: u8 = 2;
pub const MTLS_DISABLE: u8 = 3;

/// Key of `PORT_MTLS`: a pod's IPv4 address and a target port, both in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortKey {
    pub ip: u32,
    pub port: u16,
    pub _pad: u16,
}

/// Data of a `DENY_SOURCES` LPM key: destination pod (32 bits), destination port (16 bits, 0 for
/// any port) and source address, matched on `48 + source prefix` bits. Network byte order.
pub type DenyKeyData = [u8; 10];

/// Bits of `DenyKeyData` before the source address.
pub const DENY_KEY_FIXED_BITS: u32 = 48;

/// Indices of the per-CPU `STATS` counters.
pub mod stat {
    /// Packets seen by the pod-ingress program from or to pods in `POD_STATE`.
    pub const POD_PACKETS: u32 = 0;
    /// New outbound connections (SYN) handed to the outbound listener.
    pub const OUTBOUND_NEW: u32 = 1;
    /// Packets handed to an existing proxy socket.
    pub const ESTABLISHED: u32 = 2;
    /// Packets skipped because they carry the proxy's own mark.
    pub const PROXY_MARKED: u32 = 3;
    /// SYNs of a draining pod let through untouched.
    pub const DRAINING_PASSED: u32 = 4;
    /// Packets dropped because no proxy listener was registered (fail closed).
    pub const NO_LISTENER: u32 = 5;
    /// `bpf_sk_assign` failures (packet dropped).
    pub const ASSIGN_ERRORS: u32 = 6;
    /// New HBONE connections (SYN to port 15008 of a captured pod), handed to the HBONE listener.
    pub const INBOUND_HBONE_NEW: u32 = 7;
    /// New plaintext connections to a captured pod, handed to the inbound plaintext listener.
    pub const INBOUND_PLAINTEXT_NEW: u32 = 8;
    /// Packets let through without a proxy listener (the pod is not STRICT: fail open).
    pub const NO_LISTENER_PASSED: u32 = 9;
    /// XDP drops: plaintext to a STRICT pod from outside the node (CAP-4).
    pub const XDP_DROP_STRICT_PLAINTEXT: u32 = 10;
    /// XDP drops: source denied by a DENY policy on ipBlocks/ports (CAP-4).
    pub const XDP_DROP_DENY_POLICY: u32 = 11;
    /// TC drops of a new plaintext connection from a source a DENY policy names by address:
    /// the same rule as the XDP guard, applied where packets always pass, so it holds while the
    /// guard is detached (no policy before, or a proxy restart).
    pub const TC_DROP_DENY_POLICY: u32 = 12;
    /// SYNs whose 4-tuple still had a TIME_WAIT socket of an earlier proxied connection, handed
    /// to that socket so the kernel retires it (and `LOOKUP_ASSIGNED` names the listener).
    pub const TIME_WAIT_SYN: u32 = 13;
    /// Listener lookups the sk_lookup program answered with one of the proxy's listeners.
    pub const LOOKUP_ASSIGNED: u32 = 14;
    /// Packets from port 15008 handed to an HBONE connection the proxy opened from a pod's
    /// address: the peer's replies on the tunnels of this node's client pods (L4-6).
    pub const HBONE_CLIENT_REPLY: u32 = 15;
    /// Number of counters; the size of the `STATS` map (room left for new ones).
    pub const COUNT: u32 = 16;

    /// Counter names as exported by the proxy, indexed like the constants above.
    pub const NAMES: [&str; COUNT as usize] = [
        "pod_packets",
        "outbound_new",
        "established",
        "proxy_marked",
        "draining_passed",
        "no_listener",
        "assign_errors",
        "inbound_hbone_new",
        "inbound_plaintext_new",
        "no_listener_passed",
        "xdp_drop_strict_plaintext",
        "xdp_drop_deny_policy",
        "tc_drop_deny_policy",
        "time_wait_syn",
        "lookup_assigned",
        "hbone_client_reply",
    ];
}

#[cfg(feature = "user")]
// SAFETY: plain old data with no padding holes the kernel would misread.
unsafe impl aya::Pod for PortKey {}
