// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/* toktra socket tracer: outbound TCP connections to watched ports, the SNI
 * each OpenSSL client asked for, and the bytes moved. It only observes: no
 * program here can drop, delay or change a packet, and no payload byte is
 * ever read (the SNI comes from the library call's argument, not the wire).
 *
 * Flow per connection:
 *   connect (process context)      -> conns[sk] = who, when, where
 *   SSL_ctrl(ssl, 55, name)        -> names[ssl] = name
 *   SSL_do_handshake(ssl)          -> pending[tid] = ssl
 *   the thread's next send on sk   -> conns[sk].sni = names[ssl]
 *   established / close            -> one ring record each
 *   the process's first sends on sk   -> its ClientHello, in up to 4 pieces
 *   an exec mapping of a new libssl   -> a record, so user space attaches
 *
 * The send hook exists in three variants (tracepoint, fexit, syscalls); the
 * loader enables exactly one before load because an object that names a
 * missing tracepoint or a refused program type fails to load as a whole.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "toktra_socket.h"

#define TK_AF_INET 2
#define TK_AF_INET6 10
#define TK_IPPROTO_TCP 6
#define TK_TCP_ESTABLISHED 1
#define TK_TCP_SYN_SENT 2
#define TK_TCP_CLOSE 7
#define TK_S_IFMT 00170000
#define TK_S_IFSOCK 0140000
#define TK_SSL_CTRL_SET_TLSEXT_HOSTNAME 55
#define TK_PROT_EXEC 4
#define TK_TLS_HANDSHAKE 22
#define TK_CLIENT_HELLO 1
#define TK_RING_BYTES (1 << 20)
/* Records are submitted without waking the reader, which drains the ring
 * on a timer; a wake-up is forced only when the ring fills past this. */
#define TK_WAKE_AT (TK_RING_BYTES / 4)

char LICENSE[] SEC("license") = "Dual BSD/GPL";

const volatile struct toktra_config cfg = {};

struct name {
	__u16 len;
	__u8 flags;
	__u8 _pad[5];
	char sni[TOKTRA_SNI_LEN];
};

struct conn {
	__u64 start_ns;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u8 established;
	__u8 flags;
	__u16 sni_len;
	char comm[TOKTRA_COMM_LEN];
	char exe[TOKTRA_EXE_LEN];
	char sni[TOKTRA_SNI_LEN];
	/* ClientHello capture, see hello_capture() */
	__u16 hello_got;
	__u16 hello_want;
	__u8 hello_state;
	__u8 hello_chunks;
	__u8 _pad[2];
};

enum hello_state {
	HELLO_NONE = 0, /* not waited for (connections adopted at start) */
	HELLO_AWAITING = 1,
	HELLO_DONE = 2,
};

struct pending {
	__u64 ssl;
	__u64 created_ns; /* handshake entry: the ClientHello cannot predate it */
	__u64 since_ns;
	__u8 in_call; /* SSL_do_handshake has not returned yet */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* struct sock * */
	__type(value, struct conn);
} conns SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64); /* SSL * */
	__type(value, struct name);
} names SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* thread id */
	__type(value, struct pending);
} pending SEC(".maps");

/* Processes with connections whose ClientHello has not been seen yet:
 * the only ones whose writes are looked at more closely. A count per
 * process; entries at zero stay (deleting would race an increment). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32); /* tgid */
	__type(value, __s64);
} hello_wait SEC(".maps");

/* Connections that were open before the agent started, by socket cookie;
 * filled by user space after its sock_diag dump, so their close is
 * reported with byte counts. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, __u8);
} adopted SEC(".maps");

struct lib_key {
	__u64 dev;
	__u64 ino;
};

/* libssl files already reported (or attached at start by user space). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct lib_key);
	__type(value, __u8);
} libs_seen SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct conn);
} conn_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct name);
} name_scratch SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TOKTRA_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, TK_RING_BYTES);
} events SEC(".maps");

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);

	if (v)
		*v += 1;
}

static __always_inline bool watched_port(__u16 port)
{
	for (int i = 0; i < TOKTRA_MAX_PORTS; i++) {
		if (i >= cfg.nports)
			break;
		if (cfg.ports[i] == port)
			return true;
	}
	return false;
}

/* ---- connection state: tracepoint sock/inet_sock_set_state ---- */

static __always_inline void read_exe_name(char *dst)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	const unsigned char *name;

	dst[0] = 0;
	name = BPF_CORE_READ(task, mm, exe_file, f_path.dentry, d_name.name);
	if (name)
		bpf_probe_read_kernel_str(dst, TOKTRA_EXE_LEN, name);
}

static __always_inline void hello_wait_add(__u32 tgid, __s64 delta)
{
	__s64 *n = bpf_map_lookup_elem(&hello_wait, &tgid);

	if (n) {
		__sync_fetch_and_add(n, delta);
		return;
	}
	if (delta > 0)
		bpf_map_update_elem(&hello_wait, &tgid, &delta, BPF_NOEXIST);
}

static __always_inline void track_connect(__u64 sk)
{
	__u32 zero = 0;
	struct conn *c = bpf_map_lookup_elem(&conn_scratch, &zero);
	__u64 pid_tgid = bpf_get_current_pid_tgid();

	if (!c)
		return;
	/* SYN_SENT is entered inside connect(), so "current" is the
	 * connecting task; later transitions may run in softirq. */
	c->start_ns = bpf_ktime_get_boot_ns();
	c->pid = pid_tgid >> 32;
	c->tid = (__u32)pid_tgid;
	c->uid = (__u32)bpf_get_current_uid_gid();
	c->established = 0;
	c->flags = 0;
	c->sni_len = 0;
	c->sni[0] = 0;
	c->hello_got = 0;
	c->hello_want = 0;
	c->hello_chunks = 0;
	c->hello_state = HELLO_AWAITING;
	bpf_get_current_comm(c->comm, sizeof(c->comm));
	read_exe_name(c->exe);
	if (bpf_map_update_elem(&conns, &sk, c, BPF_ANY))
		return;
	hello_wait_add(c->pid, 1);
	stat_inc(TOKTRA_STAT_CONN_TRACKED);
}

/* The process stops waiting for this connection's ClientHello. */
static __always_inline void hello_release(struct conn *c)
{
	if (c->hello_state != HELLO_AWAITING)
		return;
	c->hello_state = HELLO_DONE;
	hello_wait_add(c->pid, -1);
}

static __always_inline void
emit(struct trace_event_raw_inet_sock_set_state *ctx, struct conn *c, __u8 kind)
{
	struct toktra_record *r;
	__u64 flags = BPF_RB_NO_WAKEUP;

	r = bpf_ringbuf_reserve(&events, sizeof(*r), 0);
	if (!r) {
		stat_inc(TOKTRA_STAT_RINGBUF_FULL);
		return;
	}
	r->version = TOKTRA_RECORD_VERSION;
	r->kind = kind;
	r->flags = c->flags;
	r->family = ctx->family;
	r->pid = c->pid;
	r->tid = c->tid;
	r->uid = c->uid;
	r->sock = (__u64)ctx->skaddr;
	r->start_ns = c->start_ns;
	r->end_ns = bpf_ktime_get_boot_ns();
	r->bytes_acked = 0;
	r->bytes_received = 0;
	if (kind == TOKTRA_REC_CLOSE) {
		struct tcp_sock *tp = (struct tcp_sock *)ctx->skaddr;

		r->bytes_acked = BPF_CORE_READ(tp, bytes_acked);
		r->bytes_received = BPF_CORE_READ(tp, bytes_received);
	}
	r->sport = ctx->sport;
	r->dport = ctx->dport;
	r->sni_len = c->sni_len;
	r->_pad = 0;
	/* The tracepoint's context may only be read at constant offsets,
	 * so the address arrays are copied with a helper. */
	__builtin_memset(r->saddr, 0, 16);
	__builtin_memset(r->daddr, 0, 16);
	if (ctx->family == TK_AF_INET6) {
		r->flags |= TOKTRA_F_IPV6;
		bpf_probe_read_kernel(r->saddr, 16, ctx->saddr_v6);
		bpf_probe_read_kernel(r->daddr, 16, ctx->daddr_v6);
	} else {
		bpf_probe_read_kernel(r->saddr, 4, ctx->saddr);
		bpf_probe_read_kernel(r->daddr, 4, ctx->daddr);
	}
	__builtin_memcpy(r->comm, c->comm, sizeof(r->comm));
	__builtin_memcpy(r->exe, c->exe, sizeof(r->exe));
	__builtin_memcpy(r->sni, c->sni, sizeof(r->sni));
	if (bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > TK_WAKE_AT)
		flags = BPF_RB_FORCE_WAKEUP;
	bpf_ringbuf_submit(r, flags);
}

/* A connection found open at start-up closes: report it with the counts,
 * leaving who and when to user space, which saw it in sock_diag. */
static __always_inline void
close_adopted(struct trace_event_raw_inet_sock_set_state *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	__u64 cookie = BPF_CORE_READ(sk, __sk_common.skc_cookie.counter);
	__u32 zero = 0;
	struct conn *c;

	if (!cookie || !bpf_map_lookup_elem(&adopted, &cookie))
		return;
	bpf_map_delete_elem(&adopted, &cookie);
	c = bpf_map_lookup_elem(&conn_scratch, &zero);
	if (!c)
		return;
	__builtin_memset(c, 0, sizeof(*c));
	c->flags = TOKTRA_F_ADOPTED;
	emit(ctx, c, TOKTRA_REC_CLOSE);
}

SEC("tracepoint/sock/inet_sock_set_state")
int on_state(struct trace_event_raw_inet_sock_set_state *ctx)
{
	__u64 sk = (__u64)ctx->skaddr;
	struct conn *c;

	/* Over loopback this fires about ten times per connection, both
	 * ends included: filter before touching any map. */
	if (ctx->protocol != TK_IPPROTO_TCP || !watched_port(ctx->dport))
		return 0;

	if (ctx->newstate == TK_TCP_SYN_SENT) {
		track_connect(sk);
		return 0;
	}
	if (ctx->newstate != TK_TCP_ESTABLISHED && ctx->newstate != TK_TCP_CLOSE)
		return 0;

	c = bpf_map_lookup_elem(&conns, &sk);
	if (!c) {
		if (ctx->newstate == TK_TCP_CLOSE)
			close_adopted(ctx);
		return 0;
	}
	if (ctx->newstate == TK_TCP_ESTABLISHED) {
		if (ctx->oldstate == TK_TCP_SYN_SENT && !c->established) {
			c->established = 1;
			emit(ctx, c, TOKTRA_REC_OPEN);
		}
		return 0;
	}
	hello_release(c);
	/* A connect that never completed carries nothing worth reporting. */
	if (c->established)
		emit(ctx, c, TOKTRA_REC_CLOSE);
	bpf_map_delete_elem(&conns, &sk);
	stat_inc(TOKTRA_STAT_CONN_CLOSED);
	return 0;
}

/* ---- OpenSSL uprobes ---- */

SEC("uprobe")
int ssl_ctrl(struct pt_regs *ctx)
{
	__u64 ssl = PT_REGS_PARM1(ctx);
	long cmd = (long)PT_REGS_PARM2(ctx);
	const char *arg = (const char *)PT_REGS_PARM4(ctx);
	__u32 zero = 0;
	struct name *n;
	char next = 0;
	long len;

	if (cmd != TK_SSL_CTRL_SET_TLSEXT_HOSTNAME)
		return 0;
	stat_inc(TOKTRA_STAT_SNI_SET);
	if (!arg) {
		bpf_map_delete_elem(&names, &ssl);
		return 0;
	}
	n = bpf_map_lookup_elem(&name_scratch, &zero);
	if (!n)
		return 0;
	len = bpf_probe_read_user_str(n->sni, sizeof(n->sni), arg);
	if (len <= 0) {
		stat_inc(TOKTRA_STAT_READ_ERRORS);
		return 0;
	}
	n->len = len - 1;
	n->flags = TOKTRA_F_SNI;
	/* A full buffer may hold exactly 255 bytes or the head of a longer
	 * name: one more byte tells which. */
	if (len == sizeof(n->sni)) {
		bpf_probe_read_user(&next, 1, arg + sizeof(n->sni) - 1);
		if (next)
			n->flags |= TOKTRA_F_SNI_TRUNCATED;
	}
	bpf_map_update_elem(&names, &ssl, n, BPF_ANY);
	return 0;
}

SEC("uprobe")
int ssl_handshake_enter(struct pt_regs *ctx)
{
	__u64 ssl = PT_REGS_PARM1(ctx);
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct pending p = {};

	/* Server-side handshakes and clients that set no name have nothing
	 * to bind. */
	if (!bpf_map_lookup_elem(&names, &ssl))
		return 0;
	p.ssl = ssl;
	p.created_ns = bpf_ktime_get_boot_ns();
	p.since_ns = p.created_ns;
	p.in_call = 1;
	bpf_map_update_elem(&pending, &tid, &p, BPF_ANY);
	return 0;
}

SEC("uretprobe")
int ssl_handshake_exit(struct pt_regs *ctx)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct pending *p = bpf_map_lookup_elem(&pending, &tid);

	/* Still pending after the call: the library wrote the ClientHello
	 * into a memory BIO (asyncio, Node) and the thread will send it
	 * next. Start the clock on how long that may take. */
	if (p) {
		p->in_call = 0;
		p->since_ns = bpf_ktime_get_boot_ns();
	}
	return 0;
}

SEC("uprobe")
int ssl_free(struct pt_regs *ctx)
{
	__u64 ssl = PT_REGS_PARM1(ctx);

	bpf_map_delete_elem(&names, &ssl);
	return 0;
}

/* ---- send hook: bind a pending name to the socket it leaves on ---- */

static __always_inline void bind_pending(__u32 tid, struct pending *p, __u64 sk)
{
	struct conn *c = bpf_map_lookup_elem(&conns, &sk);
	struct name *n;

	/* Not a watched connection (a pipe, a log socket): keep waiting. A
	 * connection opened after the handshake began cannot be the one its
	 * ClientHello is for (a handshake left unfinished must not name the
	 * thread's next connection); keep waiting too. */
	if (!c || c->start_ns > p->created_ns)
		return;
	/* This is the thread's next send on a watched socket, so the pending
	 * name is used up either way; a socket that already has its name is
	 * sending the rest of its own handshake. */
	if (!(c->flags & TOKTRA_F_SNI)) {
		n = bpf_map_lookup_elem(&names, &p->ssl);
		if (n) {
			c->flags |= n->flags & (TOKTRA_F_SNI | TOKTRA_F_SNI_TRUNCATED);
			c->sni_len = n->len;
			__builtin_memcpy(c->sni, n->sni, sizeof(c->sni));
			stat_inc(TOKTRA_STAT_SNI_BOUND);
		}
	}
	bpf_map_delete_elem(&pending, &tid);
}

static __always_inline struct pending *pending_for(__u32 tid)
{
	struct pending *p = bpf_map_lookup_elem(&pending, &tid);
	__u64 ttl_ns = (__u64)cfg.pending_ttl_ms * 1000000;

	if (!p)
		return 0;
	if (!p->in_call && bpf_ktime_get_boot_ns() - p->since_ns > ttl_ns) {
		bpf_map_delete_elem(&pending, &tid);
		stat_inc(TOKTRA_STAT_PENDING_STALE);
		return 0;
	}
	return p;
}

static __always_inline void on_send(__u64 sk)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	struct pending *p = pending_for(tid);

	if (p)
		bind_pending(tid, p, sk);
}

/* Variant 1: the sock_send_length tracepoint (Linux 6.3 and later). */
struct sock_msg_length_args {
	__u64 common;
	void *sk;
	__u16 family;
	__u16 protocol;
	int ret;
	int flags;
};

SEC("tracepoint/sock/sock_send_length")
int send_tp(struct sock_msg_length_args *ctx)
{
	if (ctx->protocol == TK_IPPROTO_TCP)
		on_send((__u64)ctx->sk);
	return 0;
}

/* Variant 2: fexit on tcp_sendmsg, where tracing programs may load. */
SEC("fexit/tcp_sendmsg")
int BPF_PROG(send_fexit, struct sock *sk, struct msghdr *msg, size_t size, int ret)
{
	on_send((__u64)sk);
	return 0;
}

/* ---- send-type syscalls: ClientHello capture, and send hook variant 3 ----
 *
 * These programs always run: they copy each watched connection's first TLS
 * record. When neither the tracepoint nor fexit loads they also bind
 * pending names (cfg.bind_on_syscall). A write by a process with nothing
 * to bind and no ClientHello awaited costs one or two map lookups.
 */
static __always_inline struct file *file_of_fd(long fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **fds;
	struct file *f = 0;
	unsigned int max_fds;

	if (!fdt || fd < 0)
		return 0;
	max_fds = BPF_CORE_READ(fdt, max_fds);
	if (fd >= max_fds)
		return 0;
	fds = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&f, sizeof(f), &fds[fd]))
		return 0;
	return f;
}

static __always_inline __u64 sock_of_fd(long fd)
{
	struct file *f = file_of_fd(fd);
	struct socket *so;
	umode_t mode;

	if (!f)
		return 0;
	mode = BPF_CORE_READ(f, f_inode, i_mode);
	if ((mode & TK_S_IFMT) != TK_S_IFSOCK)
		return 0;
	so = BPF_CORE_READ(f, private_data);
	return (__u64)BPF_CORE_READ(so, sk);
}

static __always_inline bool hello_awaited(__u32 tgid)
{
	__s64 *n = bpf_map_lookup_elem(&hello_wait, &tgid);

	return n && *n > 0;
}

/* Copies the next piece of the connection's first TLS record from `buf`
 * (`len` bytes being sent), bounded by the record's own length. */
static __always_inline void hello_capture(__u64 sk, const __u8 *buf, __u64 len)
{
	struct conn *c = bpf_map_lookup_elem(&conns, &sk);
	struct toktra_hello *r;
	__u8 head[9];
	__u32 want, record, hello;

	if (!c || c->hello_state != HELLO_AWAITING || !buf || !len)
		return;
	if (c->hello_got == 0) {
		/* The record header (type, version 3.x, length) and the
		 * handshake header (type, length) come first. A first send too
		 * short to hold both is not followed. */
		if (len < sizeof(head) || bpf_probe_read_user(head, sizeof(head), buf)) {
			stat_inc(TOKTRA_STAT_HELLO_PARTIAL);
			hello_release(c);
			return;
		}
		if (head[0] != TK_TLS_HANDSHAKE || head[1] != 3 ||
		    head[5] != TK_CLIENT_HELLO) {
			stat_inc(TOKTRA_STAT_HELLO_NOT_TLS);
			hello_release(c);
			return;
		}
		/* Copy no further than both lengths allow: a record that claims
		 * more than its ClientHello holds must not carry what the
		 * process writes next into the copy. */
		record = (__u32)head[3] << 8 | head[4];
		hello = 4 + ((__u32)head[6] << 16 | (__u32)head[7] << 8 | head[8]);
		want = 5 + (hello < record ? hello : record);
		c->hello_want = want > TOKTRA_HELLO_MAX ? TOKTRA_HELLO_MAX : want;
	}
	__u32 n;

	want = c->hello_want - c->hello_got;
	n = len < want ? (__u32)len : want;
	if (n > TOKTRA_HELLO_MAX)
		n = TOKTRA_HELLO_MAX;
	r = bpf_ringbuf_reserve(&events, sizeof(*r), 0);
	if (!r) {
		stat_inc(TOKTRA_STAT_RINGBUF_FULL);
		hello_release(c);
		return;
	}
	barrier_var(n);
	n &= TOKTRA_HELLO_MAX;
	if (n == 0 || bpf_probe_read_user(r->data, n, buf)) {
		bpf_ringbuf_discard(r, 0);
		stat_inc(TOKTRA_STAT_READ_ERRORS);
		hello_release(c);
		return;
	}
	r->version = TOKTRA_RECORD_VERSION;
	r->kind = TOKTRA_REC_HELLO;
	r->chunk = c->hello_chunks;
	r->_pad = 0;
	r->offset = c->hello_got;
	r->len = n;
	r->pid = c->pid;
	r->_pad2 = 0;
	r->sock = sk;
	r->start_ns = c->start_ns;
	bpf_ringbuf_submit(r, BPF_RB_NO_WAKEUP);
	c->hello_got += n;
	c->hello_chunks += 1;
	if (c->hello_got >= c->hello_want) {
		stat_inc(TOKTRA_STAT_HELLO_CAPTURED);
		hello_release(c);
	} else if (c->hello_chunks >= TOKTRA_HELLO_CHUNKS) {
		stat_inc(TOKTRA_STAT_HELLO_PARTIAL);
		hello_release(c);
	}
}

static __always_inline void on_send_syscall(long fd, const void *buf, __u64 len)
{
	__u64 pid_tgid = bpf_get_current_pid_tgid();
	__u32 tid = (__u32)pid_tgid;
	struct pending *p = 0;
	__u64 sk;

	if (cfg.bind_on_syscall)
		p = pending_for(tid);
	if (!p && !hello_awaited(pid_tgid >> 32))
		return;
	sk = sock_of_fd(fd);
	if (!sk)
		return;
	if (p)
		bind_pending(tid, p, sk);
	hello_capture(sk, buf, len);
}

/* The first buffer of an iovec array: a ClientHello is written whole. */
static __always_inline void on_send_iov(long fd, const struct iovec *iov)
{
	struct iovec first = {};

	if (iov && !bpf_probe_read_user(&first, sizeof(first), iov))
		on_send_syscall(fd, first.iov_base, first.iov_len);
	else
		on_send_syscall(fd, 0, 0);
}

SEC("tracepoint/syscalls/sys_enter_write")
int send_sys_write(struct trace_event_raw_sys_enter *ctx)
{
	on_send_syscall(ctx->args[0], (const void *)ctx->args[1], ctx->args[2]);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_sendto")
int send_sys_sendto(struct trace_event_raw_sys_enter *ctx)
{
	on_send_syscall(ctx->args[0], (const void *)ctx->args[1], ctx->args[2]);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_writev")
int send_sys_writev(struct trace_event_raw_sys_enter *ctx)
{
	if (ctx->args[2] < 1)
		return 0;
	on_send_iov(ctx->args[0], (const struct iovec *)ctx->args[1]);
	return 0;
}

SEC("tracepoint/syscalls/sys_enter_sendmsg")
int send_sys_sendmsg(struct trace_event_raw_sys_enter *ctx)
{
	struct user_msghdr msg = {};

	if (bpf_probe_read_user(&msg, sizeof(msg), (const void *)ctx->args[1]) ||
	    msg.msg_iovlen < 1)
		return 0;
	on_send_iov(ctx->args[0], msg.msg_iov);
	return 0;
}

/* ---- new libssl files: one record per file, when a process maps it ---- */

static __always_inline bool is_libssl(const unsigned char *name)
{
	static const char want[] = "libssl.so";
	char got[sizeof(want)] = {};

	if (bpf_probe_read_kernel(got, sizeof(got) - 1, name))
		return false;
	for (int i = 0; i < sizeof(want) - 1; i++)
		if (got[i] != want[i])
			return false;
	return true;
}

SEC("tracepoint/syscalls/sys_enter_mmap")
int on_mmap(struct trace_event_raw_sys_enter *ctx)
{
	long prot = ctx->args[2];
	long fd = ctx->args[4];
	struct toktra_library *r;
	struct lib_key key = {};
	const unsigned char *name;
	struct file *f;
	__u8 one = 1;

	/* The dynamic loader maps a library's code with PROT_EXEC from its
	 * file; everything else (anonymous memory, data files) stops here. */
	if (!(prot & TK_PROT_EXEC) || fd < 0)
		return 0;
	f = file_of_fd(fd);
	if (!f)
		return 0;
	name = BPF_CORE_READ(f, f_path.dentry, d_name.name);
	if (!name || !is_libssl(name))
		return 0;
	key.dev = BPF_CORE_READ(f, f_inode, i_sb, s_dev);
	key.ino = BPF_CORE_READ(f, f_inode, i_ino);
	if (bpf_map_update_elem(&libs_seen, &key, &one, BPF_NOEXIST))
		return 0; /* reported before */
	r = bpf_ringbuf_reserve(&events, sizeof(*r), 0);
	if (!r) {
		stat_inc(TOKTRA_STAT_RINGBUF_FULL);
		bpf_map_delete_elem(&libs_seen, &key);
		return 0;
	}
	r->version = TOKTRA_RECORD_VERSION;
	r->kind = TOKTRA_REC_LIBRARY;
	r->_pad = 0;
	r->pid = bpf_get_current_pid_tgid() >> 32;
	r->dev = key.dev;
	r->ino = key.ino;
	__builtin_memset(r->name, 0, sizeof(r->name));
	bpf_probe_read_kernel_str(r->name, sizeof(r->name), name);
	/* Rare and urgent: the process is about to use the library, so the
	 * reader is woken now rather than at its next drain. */
	bpf_ringbuf_submit(r, BPF_RB_FORCE_WAKEUP);
	stat_inc(TOKTRA_STAT_LIBRARY_MAPPED);
	return 0;
}
