// l7proxy kernel datapath: L3/L4 policy, conntrack and redirection to the
// transparent proxy, attached at tc clsact on each endpoint's host-side veth.
//
// Loaded by l7proxy/datapath.py with bcc. IPv4 only. See docs/datapath.md.
//
//   tc ingress (packets leaving the endpoint):   from_endpoint()
//   tc egress  (packets entering the endpoint):  to_endpoint()

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>

#ifndef PROXY_MARK
#define PROXY_MARK 0
#endif
#ifndef REDIRECT_MARK
#define REDIRECT_MARK 0
#endif
#ifndef CT_SIZE
#define CT_SIZE 65536
#endif

// The reserved world identity; the agent passes l7proxy.policy.identity.WORLD.
#ifndef IDENTITY_WORLD
#define IDENTITY_WORLD 2
#endif

// Bits of policy_value.flags, merged per port block by user space.
#define POL_ALLOW      1
#define POL_DENY       2
#define POL_REDIRECT   4
#define POL_AUDIT_DENY 8

// endpoint_info.flags
#define EP_INGRESS_ENFORCED 1
#define EP_EGRESS_ENFORCED  2
#define EP_AUDIT            4

#define DIR_INGRESS 0
#define DIR_EGRESS  1

// Outcome of judging one new flow.
#define V_ALLOW    1
#define V_REDIRECT 2
#define V_DROP     3

// conntrack_value.kind
#define CT_ALLOWED        1
#define CT_REDIRECTED     2
#define CT_PROXY_UPSTREAM 3   // the proxy's own upstream connection (SO_MARK = PROXY_MARK)

// conntrack_value.flags
#define CT_FIN_ORIG  1
#define CT_FIN_REPLY 2

// Lifetimes without traffic, in nanoseconds.
#define LIFETIME_TCP     (3600ULL * 1000000000ULL)
#define LIFETIME_CLOSING (10ULL * 1000000000ULL)
#define LIFETIME_OTHER   (60ULL * 1000000000ULL)

// Counter indexes (mirrored in datapath.py COUNTER_NAMES).
#define C_ALLOWED           0
#define C_DENIED            1
#define C_REDIRECTED        2
#define C_AUDITED           3
#define C_CT_HITS           4
#define C_PROXY_UNAVAILABLE 5
#define C_PROXY_REPLIES     6
#define C_PROXY_UPSTREAM    7
#define C_REVOKED           8
#define C_NOT_IP            9
#define C_UNSUPPORTED      10   // IPv6 or malformed IPv4 at an enforced endpoint: dropped
#define C_EVENTS_LOST      11   // ring buffer full
#define C_MAX              12

// parse() results
#define PARSED       0
#define NOT_IP       1   // ARP and other non-IP frames: passed
#define UNSUPPORTED  2   // IPv6, truncated IPv4: dropped where policy is enforced

// Drop event reasons (mirrored in datapath.py REASONS).
#define R_POLICY_DENY        1
#define R_DEFAULT_DENY       2
#define R_PROXY_UNAVAILABLE  3
#define R_REDIRECT_FROM_HOST 4
#define R_PROXY_REPLY_NO_SOCKET 5

struct ipcache_key {
    u32 prefixlen;
    u32 addr;            // network byte order
};
struct ipcache_value {
    u32 identity;
    u32 endpoint_id;     // 0 if not a local endpoint
};

struct endpoint_info {
    u32 identity;
    u32 flags;
};

// LPM key: everything but the port is matched exactly; the port (network
// byte order, so prefixes are numeric ranges) is matched by prefix.
struct policy_key {
    u32 prefixlen;
    u32 endpoint_id;
    u8  direction;
    u8  protocol;
    u16 pad1;
    u32 identity;
    u16 port;
    u16 pad2;
};
struct policy_value {
    u16 flags;
    u16 proxy_port;
};
#define POLICY_PREFIX_BASE 96   // bits before the port

struct ct_key {
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8  proto;
    u8  pad[3];
};
struct ct_value {
    u64 last_seen;
    u32 revision;
    u32 src_endpoint;
    u32 dst_endpoint;
    u16 proxy_port;
    u8  kind;
    u8  flags;
};

struct ep_counter_key {
    u32 endpoint_id;
    u32 counter;
};

struct drop_event {
    u64 time_ns;
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8  proto;
    u8  direction;
    u8  reason;
    u8  audited;
    u32 src_identity;
    u32 dst_identity;
    u32 endpoint_id;
    u32 count;      // drops of this flow summed into this event (see report())
};

// Drop events are aggregated per flow (source, destination, destination port,
// protocol, reason, direction), as Cilium's monitor aggregation does: the first
// drop of a flow is reported at once, later ones are counted and reported at
// most once per DROP_REPORT_INTERVAL_NS, with their count. A flood of denied
// SYNs costs the agent one event per flow and interval, not one per packet.
// The verdict counters are incremented for every packet regardless.
struct drop_report_key {
    u32 saddr;
    u32 daddr;
    u16 dport;
    u8  proto;
    u8  reason;
    u8  direction;
    u8  audited;
    u16 pad;
    u32 endpoint_id;
};

struct drop_report {
    u64 last_ns;     // when this flow was last reported
    u64 suppressed;  // drops since then, not reported yet
};

#ifndef DROP_REPORT_INTERVAL_NS
#define DROP_REPORT_INTERVAL_NS 1000000000ULL
#endif

// With -DPIN_DIR="/sys/fs/bpf/l7proxy-<instance>" every state map is pinned
// there: bcc reuses a map already pinned at its path, so a restarted agent
// keeps conntrack, policy and counters (docs/restarts.md). Without it the
// maps are private to this load, as before.
#ifdef PIN_DIR
#define STATE_MAP(type, key, leaf, name, max, flags) \
    BPF_TABLE_PINNED7(type, key, leaf, name, max, PIN_DIR "/" #name, flags)
#else
#define STATE_MAP(type, key, leaf, name, max, flags) \
    BPF_F_TABLE(type, key, leaf, name, max, flags)
#endif

STATE_MAP("lpm_trie", struct ipcache_key, struct ipcache_value, ipcache, 16384, BPF_F_NO_PREALLOC);
STATE_MAP("hash", u32, struct endpoint_info, endpoints, 1024, 0);
STATE_MAP("hash", u32, u32, ifindex_endpoint, 1024, 0);
STATE_MAP("lpm_trie", struct policy_key, struct policy_value, policy, 65536, BPF_F_NO_PREALLOC);
STATE_MAP("lru_hash", struct ct_key, struct ct_value, conntrack, CT_SIZE, 0);
STATE_MAP("percpu_array", u32, u64, counters, C_MAX, 0);
STATE_MAP("percpu_hash", struct ep_counter_key, u64, endpoint_counters, 16384, 0);  // 1024 endpoints x C_MAX
STATE_MAP("array", u32, u32, config, 1, 0);   // [0] = policy revision
// Proxy transparent listeners by proxy port. bcc cannot open a sockhash
// (unknown table type 18), so user space fills it by fd with raw bpf().
STATE_MAP("sockhash", u32, int, proxy_listeners, 256, 0);
BPF_RINGBUF_OUTPUT(drop_events, 64);
// Not pinned: losing it on a restart only means one more early report per flow.
BPF_TABLE("lru_hash", struct drop_report_key, struct drop_report, drop_reports, 16384);

struct packet {
    u32 saddr, daddr;
    u16 sport, dport;    // network byte order
    u8  proto;
    u8  tcp_flags;       // TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK
    // ICMP errors: the header of the packet they report on.
    u8  related;
    u8  in_proto;
    u32 in_saddr, in_daddr;
    u16 in_sport, in_dport;
};

#define TCP_FIN 1
#define TCP_SYN 2
#define TCP_RST 4
#define TCP_ACK 16

struct verdict {
    u8  action;          // V_*
    u8  reason;          // R_* when dropping
    u8  audited;
    u8  direction;       // direction responsible for a drop
    u16 proxy_port;
    u32 endpoint_id;     // endpoint whose policy dropped
};

static __always_inline void count(u32 idx, u32 endpoint_id)
{
    u64 *v = counters.lookup(&idx);
    if (v)
        *v += 1;
    if (endpoint_id) {
        struct ep_counter_key k = {.endpoint_id = endpoint_id, .counter = idx};
        u64 zero = 0;
        u64 *e = endpoint_counters.lookup_or_try_init(&k, &zero);
        if (e)
            *e += 1;
    }
}

static __always_inline int parse(struct __sk_buff *skb, struct packet *p)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return NOT_IP;
    if (eth->h_proto == bpf_htons(ETH_P_IPV6))
        return UNSUPPORTED;
    if (eth->h_proto != bpf_htons(ETH_P_IP))
        return NOT_IP;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end)
        return UNSUPPORTED;
    p->saddr = ip->saddr;
    p->daddr = ip->daddr;
    p->proto = ip->protocol;
    p->sport = 0;
    p->dport = 0;
    p->tcp_flags = 0;
    // Non-first fragments carry no ports; judged as port 0 (only "any port" rules match).
    if (ip->frag_off & bpf_htons(0x1fff))
        return PARSED;
    u32 ihl = ip->ihl * 4;
    if (ihl < sizeof(*ip))
        return UNSUPPORTED;
    void *l4 = (void *)ip + ihl;
    if (p->proto == IPPROTO_TCP) {
        struct tcphdr *tcp = l4;
        if ((void *)(tcp + 1) > data_end)
            return UNSUPPORTED;
        p->sport = tcp->source;
        p->dport = tcp->dest;
        p->tcp_flags = ((u8 *)tcp)[13];
    } else if (p->proto == IPPROTO_UDP) {
        struct udphdr *udp = l4;
        if ((void *)(udp + 1) > data_end)
            return UNSUPPORTED;
        p->sport = udp->source;
        p->dport = udp->dest;
    } else if (p->proto == IPPROTO_ICMP) {
        struct icmphdr *icmp = l4;
        if ((void *)(icmp + 1) > data_end)
            return UNSUPPORTED;
        u8 type = icmp->type;
        if (type != ICMP_DEST_UNREACH && type != ICMP_TIME_EXCEEDED && type != ICMP_PARAMETERPROB)
            return PARSED;
        // An error quotes the offending packet's IP header and first 8 bytes.
        struct iphdr *inner = (void *)(icmp + 1);
        if ((void *)(inner + 1) > data_end || inner->ihl != 5)
            return PARSED;
        u16 *ports = (void *)(inner + 1);
        if ((void *)(ports + 2) > data_end)
            return PARSED;
        p->related = 1;
        p->in_proto = inner->protocol;
        p->in_saddr = inner->saddr;
        p->in_daddr = inner->daddr;
        if (inner->protocol == IPPROTO_TCP || inner->protocol == IPPROTO_UDP) {
            p->in_sport = ports[0];
            p->in_dport = ports[1];
        }
    }
    return PARSED;
}

// An ICMP error about a packet of a tracked flow (either direction) belongs
// to that flow: path MTU discovery and port-unreachable keep working.
static __always_inline int related_to_tracked_flow(struct packet *p)
{
    if (!p->related)
        return 0;
    struct ct_key k = {};
    k.proto = p->in_proto;
    k.saddr = p->in_saddr;
    k.daddr = p->in_daddr;
    k.sport = p->in_sport;
    k.dport = p->in_dport;
    if (conntrack.lookup(&k))
        return 1;
    k.saddr = p->in_daddr;
    k.daddr = p->in_saddr;
    k.sport = p->in_dport;
    k.dport = p->in_sport;
    return conntrack.lookup(&k) != 0;
}

// What to do with a frame parse() could not judge, at an endpoint's hook.
static __always_inline int unparsed(int kind, u32 endpoint_id)
{
    if (kind == NOT_IP) {
        count(C_NOT_IP, 0);
        return TC_ACT_OK;
    }
    struct endpoint_info *ep = endpoints.lookup(&endpoint_id);
    if (ep && (ep->flags & (EP_INGRESS_ENFORCED | EP_EGRESS_ENFORCED))) {
        count(C_UNSUPPORTED, endpoint_id);
        return TC_ACT_SHOT;
    }
    return TC_ACT_OK;
}

static __always_inline void resolve(u32 addr, u32 *identity, u32 *endpoint_id)
{
    struct ipcache_key k = {.prefixlen = 32, .addr = addr};
    struct ipcache_value *v = ipcache.lookup(&k);
    if (v) {
        *identity = v->identity;
        *endpoint_id = v->endpoint_id;
    } else {
        *identity = IDENTITY_WORLD;
        *endpoint_id = 0;
    }
}

static __always_inline u16 lookup_flags(u32 endpoint_id, u8 direction, u32 identity,
                                        u8 proto, u16 port, u16 *proxy_port)
{
    struct policy_key k = {};
    k.prefixlen = POLICY_PREFIX_BASE + 16;
    k.endpoint_id = endpoint_id;
    k.direction = direction;
    k.protocol = proto;
    k.identity = identity;
    k.port = port;
    struct policy_value *v = policy.lookup(&k);
    if (!v)
        return 0;
    if ((v->flags & POL_REDIRECT) && *proxy_port == 0)
        *proxy_port = v->proxy_port;
    return v->flags;
}

// One direction of one endpoint: a fixed four lookups (peer identity or any,
// protocol or any), each an LPM over the port. The most specific redirect wins
// the proxy port.
static __always_inline u16 direction_flags(u32 endpoint_id, u8 direction, u32 peer,
                                           u8 proto, u16 port, u16 *proxy_port)
{
    u16 f = 0;
    f |= lookup_flags(endpoint_id, direction, peer, proto, port, proxy_port);
    f |= lookup_flags(endpoint_id, direction, peer, 0, port, proxy_port);
    f |= lookup_flags(endpoint_id, direction, 0, proto, port, proxy_port);
    f |= lookup_flags(endpoint_id, direction, 0, 0, port, proxy_port);
    return f;
}

// Judge one direction: returns V_* and fills reason/audited.
static __always_inline u8 judge_direction(u32 endpoint_id, u8 direction, u32 peer,
                                          struct packet *p, u16 *proxy_port,
                                          u8 *reason, u8 *audited)
{
    struct endpoint_info *ep = endpoints.lookup(&endpoint_id);
    if (!ep)
        return V_ALLOW;
    u32 enforced = direction == DIR_INGRESS ? EP_INGRESS_ENFORCED : EP_EGRESS_ENFORCED;
    u32 ep_flags = ep->flags;
    u16 f = direction_flags(endpoint_id, direction, peer, p->proto, p->dport, proxy_port);
    u8 r = 0;
    if (f & POL_DENY)
        r = R_POLICY_DENY;
    else if (f & POL_REDIRECT)
        return V_REDIRECT;
    else if (f & POL_ALLOW)
        return V_ALLOW;
    else if (f & POL_AUDIT_DENY) {
        *audited = 1;
        *reason = R_POLICY_DENY;
        return V_ALLOW;
    } else if (ep_flags & enforced)
        r = R_DEFAULT_DENY;
    else
        return V_ALLOW;
    *reason = r;
    if (ep_flags & EP_AUDIT) {
        *audited = 1;
        return V_ALLOW;
    }
    return V_DROP;
}

// The whole L3/L4 decision for a new flow from src to dst. Deny wins, then
// redirect (the destination's ingress proxy port preferred), then allow.
static __always_inline void judge(u32 src_ep, u32 src_id, u32 dst_ep, u32 dst_id,
                                  struct packet *p, struct verdict *v)
{
    u16 egress_port = 0, ingress_port = 0;
    u8 egress = V_ALLOW, ingress = V_ALLOW;
    u8 e_reason = 0, i_reason = 0, audited = 0;
    if (src_ep)
        egress = judge_direction(src_ep, DIR_EGRESS, dst_id, p, &egress_port, &e_reason, &audited);
    if (dst_ep)
        ingress = judge_direction(dst_ep, DIR_INGRESS, src_id, p, &ingress_port, &i_reason, &audited);
    v->audited = audited;
    v->proxy_port = 0;
    v->reason = 0;
    if (egress == V_DROP) {
        v->action = V_DROP;
        v->reason = e_reason;
        v->direction = DIR_EGRESS;
        v->endpoint_id = src_ep;
    } else if (ingress == V_DROP) {
        v->action = V_DROP;
        v->reason = i_reason;
        v->direction = DIR_INGRESS;
        v->endpoint_id = dst_ep;
    } else if (ingress == V_REDIRECT) {
        v->action = V_REDIRECT;
        v->proxy_port = ingress_port;
        v->direction = DIR_INGRESS;
        v->endpoint_id = dst_ep;
    } else if (egress == V_REDIRECT) {
        v->action = V_REDIRECT;
        v->proxy_port = egress_port;
        v->direction = DIR_EGRESS;
        v->endpoint_id = src_ep;
    } else {
        v->action = V_ALLOW;
        // Audited passes are reported against the direction that would have dropped.
        v->reason = e_reason ? e_reason : i_reason;
        v->direction = e_reason ? DIR_EGRESS : DIR_INGRESS;
        v->endpoint_id = e_reason ? src_ep : dst_ep;
    }
}

static __always_inline void report(struct packet *p, struct verdict *v, u32 src_id, u32 dst_id)
{
    u64 now = bpf_ktime_get_ns();
    u64 reported = 1;
    struct drop_report_key key = {};
    key.saddr = p->saddr;
    key.daddr = p->daddr;
    key.dport = p->dport;
    key.proto = p->proto;
    key.reason = v->reason;
    key.direction = v->direction;
    key.audited = v->action != V_DROP;
    key.endpoint_id = v->endpoint_id;
    struct drop_report *seen = drop_reports.lookup(&key);
    if (seen) {
        if (now - seen->last_ns < DROP_REPORT_INTERVAL_NS) {
            __sync_fetch_and_add(&seen->suppressed, 1);
            return;
        }
        // Report what was counted since the last report, and subtract exactly that:
        // drops counted by another CPU meanwhile stay for the next report.
        u64 taken = seen->suppressed;
        __sync_fetch_and_add(&seen->suppressed, -taken);
        seen->last_ns = now;
        reported += taken;
    } else {
        struct drop_report fresh = {};
        fresh.last_ns = now;
        drop_reports.update(&key, &fresh);
    }
    struct drop_event ev = {};
    ev.time_ns = now;
    ev.saddr = p->saddr;
    ev.daddr = p->daddr;
    ev.sport = p->sport;
    ev.dport = p->dport;
    ev.proto = p->proto;
    ev.direction = v->direction;
    ev.reason = v->reason;
    ev.audited = v->action != V_DROP;
    ev.src_identity = src_id;
    ev.dst_identity = dst_id;
    ev.endpoint_id = v->endpoint_id;
    ev.count = reported;
    long err = drop_events.ringbuf_output(&ev, sizeof(ev), 0);
    if (err)
        count(C_EVENTS_LOST, 0);
}

static __always_inline u32 policy_revision(void)
{
    u32 zero = 0;
    u32 *rev = config.lookup(&zero);
    return rev ? *rev : 0;
}

static __always_inline void packet_key(struct packet *p, struct ct_key *k, int reverse)
{
    __builtin_memset(k, 0, sizeof(*k));
    k->proto = p->proto;
    if (reverse) {
        k->saddr = p->daddr;
        k->daddr = p->saddr;
        k->sport = p->dport;
        k->dport = p->sport;
    } else {
        k->saddr = p->saddr;
        k->daddr = p->daddr;
        k->sport = p->sport;
        k->dport = p->dport;
    }
}

static __always_inline void ct_create(struct packet *p, u8 kind, struct verdict *v,
                                      u32 src_ep, u32 dst_ep, u32 rev)
{
    struct ct_key k;
    packet_key(p, &k, 0);
    struct ct_value val = {};
    val.last_seen = bpf_ktime_get_ns();
    val.revision = rev;
    val.src_endpoint = src_ep;
    val.dst_endpoint = dst_ep;
    val.proxy_port = v ? v->proxy_port : 0;
    val.kind = kind;
    conntrack.update(&k, &val);
}

static __always_inline u64 lifetime(struct packet *p, struct ct_value *ct)
{
    if (p->proto != IPPROTO_TCP)
        return LIFETIME_OTHER;
    if ((ct->flags & (CT_FIN_ORIG | CT_FIN_REPLY)) == (CT_FIN_ORIG | CT_FIN_REPLY))
        return LIFETIME_CLOSING;
    return LIFETIME_TCP;
}

// Conntrack lookup in both directions. Returns the entry (or NULL) and sets
// *reply when the packet travels against the entry's original direction.
// Expired entries are removed and count as a miss; RST removes the entry
// after this packet, FIN in both directions shortens its life.
static __always_inline struct ct_value *ct_lookup(struct packet *p, struct ct_key *k, int *reply)
{
    u64 now = bpf_ktime_get_ns();
    *reply = 0;
    packet_key(p, k, 0);
    struct ct_value *ct = conntrack.lookup(k);
    if (!ct) {
        // A bare SYN only ever opens a flow in its own direction: never let
        // it ride an entry of the opposite direction.
        if (p->proto == IPPROTO_TCP && (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
            return 0;
        packet_key(p, k, 1);
        ct = conntrack.lookup(k);
        if (!ct)
            return 0;
        *reply = 1;
    }
    if (now - ct->last_seen > lifetime(p, ct)) {
        conntrack.delete(k);
        return 0;
    }
    if (now - ct->last_seen > 1000000000ULL)   // refresh at most once a second
        ct->last_seen = now;
    if (p->tcp_flags & TCP_FIN)
        ct->flags |= *reply ? CT_FIN_REPLY : CT_FIN_ORIG;
    return ct;
}

static __always_inline void ct_after(struct packet *p, struct ct_key *k)
{
    if (p->proto == IPPROTO_TCP && (p->tcp_flags & TCP_RST))
        conntrack.delete(k);
}

static __always_inline u32 endpoint_identity(u32 endpoint_id, u32 fallback_addr)
{
    struct endpoint_info *ep = endpoints.lookup(&endpoint_id);
    if (ep)
        return ep->identity;
    u32 id, unused;
    resolve(fallback_addr, &id, &unused);
    return id;
}

// Hand the packet to a local socket of the proxy: an established socket for
// this exact tuple if there is one, otherwise the listener registered for
// proxy_port (0 = established only). The two pointer kinds are handled in
// separate branches: the verifier rejects one load serving both.
static __always_inline int assign_to_proxy(struct __sk_buff *skb, struct packet *p, u16 proxy_port)
{
    struct bpf_sock_tuple t = {};
    t.ipv4.saddr = p->saddr;
    t.ipv4.daddr = p->daddr;
    t.ipv4.sport = p->sport;
    t.ipv4.dport = p->dport;
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        // Not a listener (that would be some unrelated service on the original
        // port), and not a TIME_WAIT leftover when a new SYN reuses the tuple.
        int is_new = (p->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN;
        u32 state = sk->state;
        if (state != BPF_TCP_LISTEN && !(is_new && state == BPF_TCP_TIME_WAIT)) {
            long err = bpf_sk_assign(skb, sk, 0);
            bpf_sk_release(sk);
            if (err)
                return -1;
            skb->mark = REDIRECT_MARK;
            return 0;
        }
        bpf_sk_release(sk);
    }
    if (!proxy_port)
        return -1;
    u32 key = proxy_port;
    struct bpf_sock *l = (struct bpf_sock *)proxy_listeners.lookup(&key);
    if (!l)
        return -1;
    if (l->state != BPF_TCP_LISTEN) {
        bpf_sk_release(l);
        return -1;
    }
    long err = bpf_sk_assign(skb, l, 0);
    bpf_sk_release(l);
    if (err)
        return -1;
    skb->mark = REDIRECT_MARK;
    return 0;
}

static __always_inline int drop(struct packet *p, struct verdict *v, u32 src_id, u32 dst_id,
                                u32 counter)
{
    count(counter, v->endpoint_id);
    report(p, v, src_id, dst_id);
    return TC_ACT_SHOT;
}

// Re-judge an established flow after a policy change. A flow that is still
// allowed keeps its original treatment; a revoked one is dropped.
static __always_inline int revalidate(struct packet *p, struct ct_key *k, struct ct_value *ct,
                                      u32 rev, int reply)
{
    if (ct->kind == CT_PROXY_UPSTREAM || ct->revision == rev)
        return 0;
    struct packet orig = *p;
    orig.saddr = k->saddr;
    orig.daddr = k->daddr;
    orig.sport = k->sport;
    orig.dport = k->dport;
    u32 src_id = endpoint_identity(ct->src_endpoint, k->saddr);
    u32 dst_id = endpoint_identity(ct->dst_endpoint, k->daddr);
    struct verdict v = {};
    judge(ct->src_endpoint, src_id, ct->dst_endpoint, dst_id, &orig, &v);
    if (v.action == V_DROP) {
        conntrack.delete(k);
        count(C_REVOKED, v.endpoint_id);
        drop(&orig, &v, src_id, dst_id, C_DENIED);
        return -1;
    }
    ct->revision = rev;
    return 0;
}

// Packets leaving an endpoint (tc ingress of its host-side veth).
int from_endpoint(struct __sk_buff *skb)
{
    u32 ifindex = skb->ifindex;
    u32 *src_ep_p = ifindex_endpoint.lookup(&ifindex);
    if (!src_ep_p)
        return TC_ACT_OK;
    u32 src_ep = *src_ep_p;
    struct packet p = {};
    int parsed = parse(skb, &p);
    if (parsed != PARSED)
        return unparsed(parsed, src_ep);
    if (related_to_tracked_flow(&p)) {
        count(C_CT_HITS, src_ep);
        return TC_ACT_OK;
    }
    u32 rev = policy_revision();

    struct ct_key k;
    int reply;
    struct ct_value *ct = ct_lookup(&p, &k, &reply);
    if (ct) {
        if (revalidate(&p, &k, ct, rev, reply) < 0)
            return TC_ACT_SHOT;
        count(C_CT_HITS, src_ep);
        u8 kind = ct->kind;
        if (reply && (kind == CT_PROXY_UPSTREAM || kind == CT_REDIRECTED)) {
            // The server answers the proxy's transparent upstream socket.
            if (assign_to_proxy(skb, &p, 0) == 0) {
                count(C_PROXY_REPLIES, src_ep);
                ct_after(&p, &k);
                return TC_ACT_OK;
            }
            struct verdict v = {.action = V_DROP, .reason = R_PROXY_REPLY_NO_SOCKET,
                                .direction = DIR_EGRESS, .endpoint_id = src_ep};
            return drop(&p, &v, 0, 0, C_PROXY_UNAVAILABLE);
        }
        if (kind == CT_REDIRECTED) {
            u16 port = ct->proxy_port;
            if (assign_to_proxy(skb, &p, port) == 0) {
                ct_after(&p, &k);
                return TC_ACT_OK;
            }
            struct verdict v = {.action = V_DROP, .reason = R_PROXY_UNAVAILABLE,
                                .direction = DIR_EGRESS, .endpoint_id = src_ep};
            return drop(&p, &v, 0, 0, C_PROXY_UNAVAILABLE);
        }
        if (kind != CT_PROXY_UPSTREAM) {
            ct_after(&p, &k);
            return TC_ACT_OK;
        }
        // The endpoint itself reuses the tuple of an old proxy upstream flow: judge anew.
    }

    u32 src_id = endpoint_identity(src_ep, p.saddr);
    u32 dst_id, dst_ep;
    resolve(p.daddr, &dst_id, &dst_ep);
    struct verdict v = {};
    judge(src_ep, src_id, dst_ep, dst_id, &p, &v);
    if (v.action == V_DROP)
        return drop(&p, &v, src_id, dst_id, C_DENIED);
    if (v.audited) {
        count(C_AUDITED, v.endpoint_id);
        report(&p, &v, src_id, dst_id);
    }
    if (v.action == V_REDIRECT) {
        if (p.proto != IPPROTO_TCP || assign_to_proxy(skb, &p, v.proxy_port) < 0) {
            v.action = V_DROP;
            v.reason = R_PROXY_UNAVAILABLE;
            return drop(&p, &v, src_id, dst_id, C_PROXY_UNAVAILABLE);
        }
        count(C_REDIRECTED, v.endpoint_id);
        ct_create(&p, CT_REDIRECTED, &v, src_ep, dst_ep, rev);
        return TC_ACT_OK;
    }
    count(C_ALLOWED, v.endpoint_id ? v.endpoint_id : src_ep);
    ct_create(&p, CT_ALLOWED, &v, src_ep, dst_ep, rev);
    return TC_ACT_OK;
}

// Packets entering an endpoint from the root namespace (tc egress of its
// host-side veth): forwarded traffic of flows judged at their source, the
// proxy's own connections, and traffic from the host or the outside.
int to_endpoint(struct __sk_buff *skb)
{
    u32 ifindex = skb->ifindex;
    u32 *dst_ep_p = ifindex_endpoint.lookup(&ifindex);
    if (!dst_ep_p)
        return TC_ACT_OK;
    u32 dst_ep = *dst_ep_p;
    struct packet p = {};
    int parsed = parse(skb, &p);
    if (parsed != PARSED)
        return unparsed(parsed, dst_ep);
    if (related_to_tracked_flow(&p)) {
        count(C_CT_HITS, dst_ep);
        return TC_ACT_OK;
    }
    u32 rev = policy_revision();

    struct ct_key k;
    int reply;
    struct ct_value *ct = ct_lookup(&p, &k, &reply);
    if (ct) {
        if (revalidate(&p, &k, ct, rev, reply) < 0)
            return TC_ACT_SHOT;
        count(C_CT_HITS, dst_ep);
        ct_after(&p, &k);
        return TC_ACT_OK;
    }
    if (PROXY_MARK && skb->mark == PROXY_MARK) {
        // The proxy's upstream connection, already judged when its client's
        // flow was redirected. Remember it so the replies reach the proxy.
        count(C_PROXY_UPSTREAM, dst_ep);
        ct_create(&p, CT_PROXY_UPSTREAM, 0, 0, dst_ep, rev);
        return TC_ACT_OK;
    }

    u32 src_id, src_ep;
    resolve(p.saddr, &src_id, &src_ep);
    u32 dst_id = endpoint_identity(dst_ep, p.daddr);
    struct verdict v = {};
    judge(src_ep, src_id, dst_ep, dst_id, &p, &v);
    if (v.action == V_DROP)
        return drop(&p, &v, src_id, dst_id, C_DENIED);
    if (v.action == V_REDIRECT) {
        // tc egress cannot sk_assign: a redirect for traffic that did not come
        // from a local endpoint fails closed.
        v.action = V_DROP;
        v.reason = R_REDIRECT_FROM_HOST;
        return drop(&p, &v, src_id, dst_id, C_PROXY_UNAVAILABLE);
    }
    if (v.audited) {
        count(C_AUDITED, v.endpoint_id);
        report(&p, &v, src_id, dst_id);
    }
    count(C_ALLOWED, v.endpoint_id ? v.endpoint_id : dst_ep);
    ct_create(&p, CT_ALLOWED, &v, src_ep, dst_ep, rev);
    return TC_ACT_OK;
}

// Packets arriving from other nodes (tc ingress of a node device, `--devices`).
// A new TCP flow to a local endpoint whose ingress rule sends it to the proxy is
// handed over here, where sk_assign works (tc egress of the endpoint's veth, where
// to_endpoint runs, cannot), and so are the later packets of that flow and the
// answers of a remote server to the proxy's upstream socket. Everything else goes
// on unjudged: to_endpoint judges it at the endpoint's veth as before.
int from_netdev(struct __sk_buff *skb)
{
    struct packet p = {};
    if (parse(skb, &p) != PARSED || p.related)
        return TC_ACT_OK;
    u32 dst_id, dst_ep;
    resolve(p.daddr, &dst_id, &dst_ep);
    if (!dst_ep)
        return TC_ACT_OK;   // not for an endpoint of this node
    u32 rev = policy_revision();
    struct ct_key k;
    int reply;
    struct ct_value *ct = ct_lookup(&p, &k, &reply);
    if (ct) {
        u8 kind = ct->kind;
        if (reply && (kind == CT_PROXY_UPSTREAM || kind == CT_REDIRECTED)) {
            // A server on another node answers the proxy's transparent upstream socket.
            if (assign_to_proxy(skb, &p, 0) == 0) {
                count(C_PROXY_REPLIES, dst_ep);
                ct_after(&p, &k);
                return TC_ACT_OK;
            }
            struct verdict v = {.action = V_DROP, .reason = R_PROXY_REPLY_NO_SOCKET,
                                .direction = DIR_INGRESS, .endpoint_id = dst_ep};
            return drop(&p, &v, 0, 0, C_PROXY_UNAVAILABLE);
        }
        if (!reply && kind == CT_REDIRECTED) {
            if (revalidate(&p, &k, ct, rev, reply) < 0)
                return TC_ACT_SHOT;
            u16 port = ct->proxy_port;
            if (assign_to_proxy(skb, &p, port) == 0) {
                count(C_CT_HITS, dst_ep);
                ct_after(&p, &k);
                return TC_ACT_OK;
            }
            struct verdict v = {.action = V_DROP, .reason = R_PROXY_UNAVAILABLE,
                                .direction = DIR_INGRESS, .endpoint_id = dst_ep};
            return drop(&p, &v, 0, 0, C_PROXY_UNAVAILABLE);
        }
        return TC_ACT_OK;
    }
    if (p.proto != IPPROTO_TCP)
        return TC_ACT_OK;
    u32 src_id, src_ep;
    resolve(p.saddr, &src_id, &src_ep);
    struct verdict v = {};
    judge(src_ep, src_id, dst_ep, dst_id, &p, &v);
    if (v.action != V_REDIRECT)
        return TC_ACT_OK;   // allowed or dropped by to_endpoint, counted there
    if (assign_to_proxy(skb, &p, v.proxy_port) < 0) {
        v.action = V_DROP;
        v.reason = R_PROXY_UNAVAILABLE;
        return drop(&p, &v, src_id, dst_id, C_PROXY_UNAVAILABLE);
    }
    if (v.audited) {
        count(C_AUDITED, v.endpoint_id);
        report(&p, &v, src_id, dst_id);
    }
    count(C_REDIRECTED, v.endpoint_id);
    ct_create(&p, CT_REDIRECTED, &v, src_ep, dst_ep, rev);
    return TC_ACT_OK;
}

// Packets leaving for other nodes (tc egress of a node device): the proxy's
// upstream connections to servers there are remembered, so that from_netdev hands
// their answers to the proxy rather than to the endpoint whose address they carry.
int to_netdev(struct __sk_buff *skb)
{
    if (!PROXY_MARK || skb->mark != PROXY_MARK)
        return TC_ACT_OK;
    struct packet p = {};
    if (parse(skb, &p) != PARSED || p.proto != IPPROTO_TCP)
        return TC_ACT_OK;
    struct ct_key k;
    int reply;
    if (ct_lookup(&p, &k, &reply))
        return TC_ACT_OK;
    u32 src_id, src_ep;
    resolve(p.saddr, &src_id, &src_ep);
    ct_create(&p, CT_PROXY_UPSTREAM, 0, src_ep, 0, policy_revision());
    return TC_ACT_OK;
}
