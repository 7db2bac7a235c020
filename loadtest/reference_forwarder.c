/*
 * reference_forwarder: the physical limit for the relay's hot path on this machine.
 *
 * Same job as a relay worker minus routing: receive from the shared public port (SO_REUSEPORT),
 * prepend the 20-byte link header (version | flags | client port | client IP16) and forward to
 * the transceiver; in the other direction, accept link datagrams only from the transceiver,
 * strip the header and send the payload to the client it names, from the public port. Batches
 * with recvmmsg/sendmmsg. Each worker owns one link socket and sends HELLO to the transceiver
 * every second, like the relay, so the benchmark harness treats both the same way.
 *
 * usage: reference_forwarder --public IP:PORT --transceiver IP:PORT --workers N
 * IPv4 only (the benchmark runs on 127.0.0.1). Prints "reference ready" once every worker is
 * bound; SIGTERM stops the workers. Built by loadtest/native.py with gcc -O2.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define HEADER_BYTES 20
#define MAX_DATAGRAM_BYTES 2048
#define FLAG_CONTROL 0x01
#define HELLO_INTERVAL_MS 1000
#define MAX_WORKERS 64

static volatile sig_atomic_t stopping = 0;

static void on_signal(int signum) {
    (void)signum;
    stopping = 1;
}

static int parse_addr(const char *text, struct sockaddr_in *out) {
    char host[64];
    const char *colon = strrchr(text, ':');
    if (!colon || (size_t)(colon - text) >= sizeof host) return -1;
    memcpy(host, text, (size_t)(colon - text));
    host[colon - text] = 0;
    memset(out, 0, sizeof *out);
    out->sin_family = AF_INET;
    out->sin_port = htons((uint16_t)atoi(colon + 1));
    return inet_pton(AF_INET, host, &out->sin_addr) == 1 ? 0 : -1;
}

static int udp_socket(const struct sockaddr_in *bind_to, int reuseport) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    int one = 1, buf_bytes = 4 << 20;
    if (fd < 0) return -1;
    if (reuseport) setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &buf_bytes, sizeof buf_bytes);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &buf_bytes, sizeof buf_bytes);
    if (bind(fd, (const struct sockaddr *)bind_to, sizeof *bind_to) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Buffers of one worker: received datagrams, their sources, outgoing headers. */
struct batch {
    uint8_t data[BATCH][MAX_DATAGRAM_BYTES];
    uint8_t headers[BATCH][HEADER_BYTES];
    struct sockaddr_in peers[BATCH];
    struct iovec rx_iov[BATCH];
    struct iovec tx_iov[BATCH][2];
    struct mmsghdr rx[BATCH];
    struct mmsghdr tx[BATCH];
};

static int receive_batch(int fd, struct batch *b) {
    for (int i = 0; i < BATCH; i++) {
        b->rx_iov[i].iov_base = b->data[i];
        b->rx_iov[i].iov_len = MAX_DATAGRAM_BYTES;
        memset(&b->rx[i].msg_hdr, 0, sizeof b->rx[i].msg_hdr);
        b->rx[i].msg_hdr.msg_iov = &b->rx_iov[i];
        b->rx[i].msg_hdr.msg_iovlen = 1;
        b->rx[i].msg_hdr.msg_name = &b->peers[i];
        b->rx[i].msg_hdr.msg_namelen = sizeof b->peers[i];
    }
    return recvmmsg(fd, b->rx, BATCH, MSG_DONTWAIT, NULL);
}

static void send_all(int fd, struct mmsghdr *msgs, int count) {
    int done = 0;
    while (done < count) {
        int sent = sendmmsg(fd, msgs + done, (unsigned)(count - done), 0);
        if (sent < 0 && errno == EINTR) continue;
        done += sent > 0 ? sent : 1; /* skip a datagram the kernel refuses */
    }
}

static void write_header(uint8_t *h, const struct sockaddr_in *client) {
    h[0] = 1;
    h[1] = 0;
    memcpy(h + 2, &client->sin_port, 2);
    memset(h + 4, 0, 10);
    h[14] = 0xff;
    h[15] = 0xff;
    memcpy(h + 16, &client->sin_addr, 4);
}

static void set_tx(struct mmsghdr *m, struct iovec *iov, int iovlen, struct sockaddr_in *to) {
    memset(&m->msg_hdr, 0, sizeof m->msg_hdr);
    m->msg_hdr.msg_iov = iov;
    m->msg_hdr.msg_iovlen = (size_t)iovlen;
    m->msg_hdr.msg_name = to;
    m->msg_hdr.msg_namelen = sizeof *to;
}

/* client -> transceiver: header + untouched payload. */
static void pump_from_clients(int public_fd, int link_fd, struct sockaddr_in *trx,
                              struct batch *b) {
    int n = receive_batch(public_fd, b);
    for (int i = 0; i < n; i++) {
        write_header(b->headers[i], &b->peers[i]);
        b->tx_iov[i][0] = (struct iovec){b->headers[i], HEADER_BYTES};
        b->tx_iov[i][1] = (struct iovec){b->data[i], b->rx[i].msg_len};
        set_tx(&b->tx[i], b->tx_iov[i], 2, trx);
    }
    if (n > 0) send_all(link_fd, b->tx, n);
}

static int is_v4_mapped(const uint8_t *ip16) {
    static const uint8_t prefix[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    return memcmp(ip16, prefix, 12) == 0;
}

/* transceiver -> client: strip the header, send from the public port. */
static void pump_to_clients(int public_fd, int link_fd, struct sockaddr_in *trx,
                            struct batch *b) {
    int n = receive_batch(link_fd, b), out = 0;
    for (int i = 0; i < n; i++) {
        uint8_t *d = b->data[i];
        if (b->peers[i].sin_port != trx->sin_port ||
            b->peers[i].sin_addr.s_addr != trx->sin_addr.s_addr)
            continue;
        if (b->rx[i].msg_len <= HEADER_BYTES || d[0] != 1 || (d[1] & FLAG_CONTROL)) continue;
        if (!is_v4_mapped(d + 4)) continue;
        struct sockaddr_in *to = &b->peers[out];
        to->sin_family = AF_INET;
        memcpy(&to->sin_port, d + 2, 2);
        memcpy(&to->sin_addr, d + 16, 4);
        b->tx_iov[out][0] = (struct iovec){d + HEADER_BYTES, b->rx[i].msg_len - HEADER_BYTES};
        set_tx(&b->tx[out], b->tx_iov[out], 1, to);
        out++;
    }
    if (out > 0) send_all(public_fd, b->tx, out);
}

/* Unsigned: only the bench's stand-in transceiver (loadtest.sessions.LinkPeer) hears it. */
static void send_hello(int link_fd, struct sockaddr_in *trx) {
    uint8_t hello[HEADER_BYTES + 1] = {1, FLAG_CONTROL};
    hello[HEADER_BYTES] = 1; /* ControlType.HELLO */
    sendto(link_fd, hello, sizeof hello, 0, (struct sockaddr *)trx, sizeof *trx);
}

static int run_worker(int public_fd, int link_fd, struct sockaddr_in *trx) {
    static struct batch b;
    struct pollfd fds[2] = {{public_fd, POLLIN, 0}, {link_fd, POLLIN, 0}};
    uint64_t next_hello_ms = 0;
    while (!stopping) {
        if (now_ms() >= next_hello_ms) {
            send_hello(link_fd, trx);
            next_hello_ms = now_ms() + HELLO_INTERVAL_MS;
        }
        if (poll(fds, 2, 200) <= 0) continue;
        if (fds[0].revents & POLLIN) pump_from_clients(public_fd, link_fd, trx, &b);
        if (fds[1].revents & POLLIN) pump_to_clients(public_fd, link_fd, trx, &b);
    }
    return 0;
}

static int start_worker(struct sockaddr_in *pub, struct sockaddr_in *trx) {
    struct sockaddr_in link = {.sin_family = AF_INET, .sin_addr = trx->sin_addr};
    int public_fd = udp_socket(pub, 1), link_fd = udp_socket(&link, 0);
    if (public_fd < 0 || link_fd < 0) {
        perror("reference_forwarder: bind");
        return -1;
    }
    pid_t pid = fork();
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        _exit(run_worker(public_fd, link_fd, trx));
    }
    close(public_fd);
    close(link_fd);
    return pid;
}

static const char *flag_value(int argc, char **argv, const char *name) {
    for (int i = 1; i + 1 < argc; i++)
        if (strcmp(argv[i], name) == 0) return argv[i + 1];
    return NULL;
}

int main(int argc, char **argv) {
    const char *public_text = flag_value(argc, argv, "--public");
    const char *trx_text = flag_value(argc, argv, "--transceiver");
    const char *workers_text = flag_value(argc, argv, "--workers");
    int workers = workers_text ? atoi(workers_text) : 1;
    struct sockaddr_in pub, trx;
    pid_t pids[MAX_WORKERS];
    if (!public_text || !trx_text || parse_addr(public_text, &pub) || parse_addr(trx_text, &trx) ||
        workers < 1 || workers > MAX_WORKERS) {
        fprintf(stderr, "usage: %s --public IP:PORT --transceiver IP:PORT --workers N\n", argv[0]);
        return 2;
    }
    sigset_t stop_signals, waiting;
    sigemptyset(&stop_signals);
    sigaddset(&stop_signals, SIGTERM);
    sigaddset(&stop_signals, SIGINT);
    sigprocmask(SIG_BLOCK, &stop_signals, &waiting); /* no lost wake-up before sigsuspend */
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    for (int i = 0; i < workers; i++)
        if ((pids[i] = start_worker(&pub, &trx)) < 0) return 1;
    printf("reference ready\n");
    fflush(stdout);
    while (!stopping) sigsuspend(&waiting);
    for (int i = 0; i < workers; i++) kill(pids[i], SIGTERM);
    for (int i = 0; i < workers; i++) waitpid(pids[i], NULL, 0);
    return 0;
}
