/* Records and configuration shared by the BPF programs and the Python
 * loader (agent/collector/records.py mirrors this layout; keep the two in
 * step and bump TOKTRA_RECORD_VERSION when the layout changes).
 */
#ifndef TOKTRA_SOCKET_H
#define TOKTRA_SOCKET_H

#define TOKTRA_RECORD_VERSION 2
#define TOKTRA_MAX_PORTS 16
#define TOKTRA_COMM_LEN 16
/* One more than the longest legal hostname, so a 255-byte name still fits
 * with its NUL and a longer one is seen as truncated. */
#define TOKTRA_SNI_LEN 256
/* The executable's file name (not its path), read in the kernel at
 * connect so that even a process gone by the time user space looks has
 * one; user space prefers the full path from /proc when it can get it. */
#define TOKTRA_EXE_LEN 64
/* At most this much of a connection's first TLS record is copied, and
 * never a byte past that record: it is the ClientHello, read only for the
 * server_name in it. */
#define TOKTRA_HELLO_MAX 2047
#define TOKTRA_HELLO_BUF 2048
/* A ClientHello written in more pieces than this is given up on. */
#define TOKTRA_HELLO_CHUNKS 4
#define TOKTRA_LIB_NAME_LEN 64

enum toktra_record_kind {
	TOKTRA_REC_OPEN = 1,  /* connection established */
	TOKTRA_REC_CLOSE = 2, /* connection closed, with final byte counts */
	TOKTRA_REC_HELLO = 3, /* a piece of a connection's ClientHello record */
	TOKTRA_REC_LIBRARY = 4, /* a process mapped a libssl file not seen yet */
};

enum toktra_record_flags {
	TOKTRA_F_SNI = 1 << 0,           /* sni holds a name from OpenSSL */
	TOKTRA_F_SNI_TRUNCATED = 1 << 1, /* the name did not fit in sni */
	TOKTRA_F_IPV6 = 1 << 2,          /* addresses are IPv6 */
	TOKTRA_F_ADOPTED = 1 << 3,       /* opened before the agent; see adopted */
};

/* Indices of the per-CPU counters in the `stats` map. */
enum toktra_stat {
	TOKTRA_STAT_RINGBUF_FULL = 0,   /* bpf_ringbuf_reserve failed */
	TOKTRA_STAT_CONN_TRACKED = 1,   /* connects to a watched port */
	TOKTRA_STAT_CONN_CLOSED = 2,    /* tracked connections closed */
	TOKTRA_STAT_SNI_SET = 3,        /* SSL_ctrl(55) calls seen */
	TOKTRA_STAT_SNI_BOUND = 4,      /* names bound to a socket */
	TOKTRA_STAT_PENDING_STALE = 5,  /* pending names dropped unused */
	TOKTRA_STAT_READ_ERRORS = 6,    /* failed reads of user memory */
	TOKTRA_STAT_HELLO_CAPTURED = 7, /* ClientHello records copied whole */
	TOKTRA_STAT_HELLO_NOT_TLS = 8,  /* first send was not a TLS handshake */
	TOKTRA_STAT_HELLO_PARTIAL = 9,  /* gave up on a ClientHello's pieces */
	TOKTRA_STAT_LIBRARY_MAPPED = 10, /* new libssl files reported */
	TOKTRA_STAT_MAX = 11,
};

/* Written into .rodata by the loader before load. */
struct toktra_config {
	__u16 ports[TOKTRA_MAX_PORTS];
	__u32 nports;
	__u32 pending_ttl_ms; /* how long a handshake's name waits for a send */
	__u8 bind_on_syscall; /* the syscall programs also bind pending names */
	__u8 _pad[3];
};

struct toktra_record {
	__u8 version;
	__u8 kind;
	__u8 flags;
	__u8 family;
	__u32 pid;
	__u32 tid;
	__u32 uid;
	__u64 sock;     /* kernel address of the socket, an id within a boot */
	__u64 start_ns; /* CLOCK_BOOTTIME at connect */
	__u64 end_ns;   /* CLOCK_BOOTTIME at this record */
	__u64 bytes_acked;
	__u64 bytes_received;
	__u16 sport;
	__u16 dport;
	__u16 sni_len;
	__u16 _pad;
	__u8 saddr[16];
	__u8 daddr[16];
	char comm[TOKTRA_COMM_LEN];
	char exe[TOKTRA_EXE_LEN];
	char sni[TOKTRA_SNI_LEN];
};

/* TOKTRA_REC_HELLO: bytes [offset, offset + len) of the first TLS record
 * the connection sent. */
struct toktra_hello {
	__u8 version;
	__u8 kind;
	__u8 chunk; /* 0 for the piece that starts the record */
	__u8 _pad;
	__u16 offset;
	__u16 len;
	__u32 pid;
	__u32 _pad2;
	__u64 sock;
	__u64 start_ns; /* with sock, names the connection */
	__u8 data[TOKTRA_HELLO_BUF];
};

/* TOKTRA_REC_LIBRARY: user space finds the path in /proc/PID/maps by the
 * inode and attaches the OpenSSL uprobes to it. */
struct toktra_library {
	__u8 version;
	__u8 kind;
	__u16 _pad;
	__u32 pid;
	__u64 dev; /* the kernel's encoding: major << 20 | minor */
	__u64 ino;
	char name[TOKTRA_LIB_NAME_LEN];
};

#endif
