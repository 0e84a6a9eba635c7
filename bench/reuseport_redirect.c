// bench/reuseport_redirect.py: does bpf_sk_assign at tc honour a reuseport group?
// The smallest redirect the agent's datapath makes (bpf/sockmap.c assign_to_proxy):
// TCP to port 80 goes to an established socket of its tuple, or else to the one
// listener registered in a sockhash, which is a member of a SO_REUSEPORT group.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>

BPF_F_TABLE("sockhash", u32, int, listener, 1, 0);
BPF_ARRAY(assigned, u64, 2);  // [0] packets assigned, [1] assign errors

int redirect(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip = data + sizeof(*eth);
    struct tcphdr *tcp = (void *)ip + sizeof(*ip);
    if ((void *)(tcp + 1) > end || eth->h_proto != htons(ETH_P_IP) || ip->protocol != IPPROTO_TCP
        || ip->ihl != 5 || tcp->dest != htons(80))
        return TC_ACT_OK;
    struct bpf_sock_tuple t = {};
    t.ipv4.saddr = ip->saddr;
    t.ipv4.daddr = ip->daddr;
    t.ipv4.sport = tcp->source;
    t.ipv4.dport = tcp->dest;
    long err;
    struct bpf_sock *sk = bpf_skc_lookup_tcp(skb, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
    if (sk) {
        if (sk->state != BPF_TCP_LISTEN) {
            err = bpf_sk_assign(skb, sk, 0);
            bpf_sk_release(sk);
            goto done;
        }
        bpf_sk_release(sk);
    }
    u32 key = 0;
    struct bpf_sock *l = (struct bpf_sock *)listener.lookup(&key);
    if (!l)
        return TC_ACT_OK;
    err = bpf_sk_assign(skb, l, 0);
    bpf_sk_release(l);
done:;
    int slot = err ? 1 : 0;
    u64 *n = assigned.lookup(&slot);
    if (n)
        __sync_fetch_and_add(n, 1);
    if (!err)
        skb->mark = MARK;
    return TC_ACT_OK;
}
