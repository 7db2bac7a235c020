/*
 * udpecho: the three UDP programs of the ports scenario (loadtest/ports.py), run inside its
 * network namespace.
 *
 * echo:  bind --count consecutive ports from --first on --bind and send every datagram back to
 *        its source (epoll over all the sockets; recvmmsg/sendmmsg on each ready socket, so one
 *        socket and many sockets run the same code). Prints "ready" once every port is bound;
 *        on SIGTERM prints {"echoed": n} and exits.
 *   udpecho echo --bind IP --first PORT --count N
 *
 * probe: the first packet of new flows. For each --port, a new socket (a new source port, kept
 *        open until the end so no source port is reused and conntrack sees a new flow each
 *        time) sends one datagram to --dest:PORT and waits for the echo.
 *   udpecho probe --dest IP --timeout-ms T --payload-bytes P --port PORT ...
 *   prints {"rtt_ns": [..]}, one per --port in order, -1 where no echo came within T
 *
 * load:  --pps datagrams per second for --duration-ms (paced in 1 ms ticks), round robin over
 *        --count ports from --first on --dest, from --sockets sockets: the j-th of
 *        max(N, S) slots sends from socket j % S to port j % N, so there are max(N, S) flows
 *        (N ports from S <= N sockets: N flows; one port: S flows). Echoes are counted, not timed.
 *   udpecho load --dest IP --first PORT --count N --sockets S --pps R --duration-ms D
 *                --payload-bytes P [--src-first PORT]
 *   (--src-first binds the sockets to S consecutive source ports from PORT instead of
 *   ephemeral ones, so that no flow of one run is taken for a flow of an earlier run)
 *   prints {"sent": n, "received": n, "elapsed_s": s}
 *
 * IPv4 only. Built by loadtest/native.py with gcc -O2.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define EVENTS 256
#define MAX_PROBES 4096
#define MAX_DATAGRAM_BYTES 2048
#define DRAIN_MS 200
#define SOCKET_BUFFER_BYTES (1 << 20)

struct options {
    struct in_addr addr;
    long first, count, sockets, pps, duration_ms, payload_bytes, timeout_ms, src_first;
    long probe_ports[MAX_PROBES];
    int n_probes;
};

static struct options opt = {.first = 0, .count = 1, .sockets = 64, .pps = 10000,
                             .duration_ms = 1000, .payload_bytes = 200, .timeout_ms = 200};
static volatile sig_atomic_t stopping;
static uint8_t payload[MAX_DATAGRAM_BYTES];

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void on_term(int sig) {
    (void)sig;
    stopping = 1;
}

static void die(const char *what) {
    perror(what);
    exit(1);
}

static struct sockaddr_in address(struct in_addr addr, long port) {
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr = addr;
    return sa;
}

static int udp_socket(struct in_addr addr, long port) {
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    if (fd < 0) die("socket");
    int size = SOCKET_BUFFER_BYTES;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    struct sockaddr_in sa = address(addr, port);
    if (bind(fd, (struct sockaddr *)&sa, sizeof sa) < 0) die("bind");
    return fd;
}

static int add_to_epoll(int ep, int fd) {
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = fd};
    return epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

/* Receive what one socket holds (up to BATCH datagrams) and send it back; returns how many. */
static int echo_batch(int fd) {
    static uint8_t bufs[BATCH][MAX_DATAGRAM_BYTES];
    static struct sockaddr_in peers[BATCH];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    for (int i = 0; i < BATCH; i++) {
        iov[i] = (struct iovec){.iov_base = bufs[i], .iov_len = MAX_DATAGRAM_BYTES};
        msgs[i].msg_hdr = (struct msghdr){.msg_name = &peers[i], .msg_namelen = sizeof peers[i],
                                          .msg_iov = &iov[i], .msg_iovlen = 1};
    }
    int n = recvmmsg(fd, msgs, BATCH, MSG_DONTWAIT, NULL);
    if (n <= 0) return 0;
    for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
    for (int sent = 0; sent < n;) {
        int k = sendmmsg(fd, msgs + sent, (unsigned)(n - sent), 0);
        if (k <= 0) break; /* a full send buffer drops the rest, as a busy server would */
        sent += k;
    }
    return n;
}

static int run_echo(void) {
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    for (long i = 0; i < opt.count; i++)
        if (add_to_epoll(ep, udp_socket(opt.addr, opt.first + i)) < 0) die("epoll_ctl");
    signal(SIGTERM, on_term);
    printf("ready\n");
    fflush(stdout);
    long long echoed = 0;
    struct epoll_event events[EVENTS];
    while (!stopping) {
        int n = epoll_wait(ep, events, EVENTS, 100);
        for (int i = 0; i < n; i++) echoed += echo_batch(events[i].data.fd);
    }
    printf("{\"echoed\": %lld}\n", echoed);
    return 0;
}

static int wait_readable(int fd, int64_t deadline_ns) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int64_t left_ms;
    while ((left_ms = (deadline_ns - now_ns()) / 1000000) >= 0) {
        int r = poll(&p, 1, (int)left_ms + 1);
        if (r > 0) return 1;
        if (r < 0 && errno != EINTR) die("poll");
        if (r == 0 && now_ns() >= deadline_ns) return 0;
    }
    return 0;
}

static int run_probe(void) {
    static int64_t rtt[MAX_PROBES];
    static int fds[MAX_PROBES];
    struct in_addr any = {.s_addr = htonl(INADDR_ANY)};
    uint8_t reply[MAX_DATAGRAM_BYTES];
    for (int p = 0; p < opt.n_probes; p++) {
        int fd = fds[p] = udp_socket(any, 0);
        struct sockaddr_in dest = address(opt.addr, opt.probe_ports[p]);
        int64_t t0 = now_ns();
        if (sendto(fd, payload, (size_t)opt.payload_bytes, 0, (struct sockaddr *)&dest,
                   sizeof dest) < 0)
            die("sendto");
        int64_t deadline = t0 + opt.timeout_ms * 1000000;
        int got = 0;
        while (!got && wait_readable(fd, deadline))
            got = recv(fd, reply, sizeof reply, MSG_DONTWAIT) == opt.payload_bytes;
        rtt[p] = got ? now_ns() - t0 : -1;
    }
    printf("{\"rtt_ns\": [");
    for (int p = 0; p < opt.n_probes; p++) printf("%s%lld", p ? "," : "", (long long)rtt[p]);
    printf("]}\n");
    for (int p = 0; p < opt.n_probes; p++) close(fds[p]);
    return 0;
}

static long long drain(int ep, int timeout_ms) {
    static uint8_t buf[MAX_DATAGRAM_BYTES];
    struct epoll_event events[EVENTS];
    long long got = 0;
    int n = epoll_wait(ep, events, EVENTS, timeout_ms);
    for (int i = 0; i < n; i++)
        while (recv(events[i].data.fd, buf, sizeof buf, MSG_DONTWAIT) > 0) got++;
    return got;
}

static int run_load(void) {
    int ep = epoll_create1(0);
    if (ep < 0) die("epoll_create1");
    long n_sockets = opt.sockets, slots = opt.count > n_sockets ? opt.count : n_sockets;
    int *fds = calloc((size_t)n_sockets, sizeof *fds);
    if (!fds) die("calloc");
    struct in_addr any = {.s_addr = htonl(INADDR_ANY)};
    for (long s = 0; s < n_sockets; s++)
        if (add_to_epoll(ep, fds[s] = udp_socket(any, opt.src_first ? opt.src_first + s : 0)) < 0)
            die("epoll_ctl");
    long long sent = 0, received = 0;
    int64_t start = now_ns(), end = start + opt.duration_ms * 1000000;
    for (int64_t t = start; t < end; t = now_ns()) {
        long long due = (long long)((double)(t - start) * (double)opt.pps / 1e9);
        for (int k = 0; sent < due && k < BATCH; k++, sent++) {
            long j = (long)(sent % slots);
            struct sockaddr_in dest = address(opt.addr, opt.first + j % opt.count);
            sendto(fds[j % n_sockets], payload, (size_t)opt.payload_bytes, 0,
                   (struct sockaddr *)&dest, sizeof dest);
        }
        received += drain(ep, sent < due ? 0 : 1);
    }
    double elapsed_s = (double)(now_ns() - start) / 1e9;
    for (int64_t until = now_ns() + DRAIN_MS * 1000000LL; received < sent && now_ns() < until;)
        received += drain(ep, 10);
    printf("{\"sent\": %lld, \"received\": %lld, \"elapsed_s\": %.6f}\n", sent, received,
           elapsed_s);
    return 0;
}

static long number(const char *flag, const char *text, long low, long high) {
    char *end;
    long value = strtol(text, &end, 10);
    if (*end || value < low || value > high) {
        fprintf(stderr, "udpecho: %s must be an integer in [%ld, %ld], got %s\n", flag, low, high,
                text);
        exit(2);
    }
    return value;
}

static void parse(int argc, char **argv) {
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *flag = argv[i], *value = argv[i + 1];
        if (!strcmp(flag, "--bind") || !strcmp(flag, "--dest")) {
            if (inet_pton(AF_INET, value, &opt.addr) != 1) {
                fprintf(stderr, "udpecho: %s wants an IPv4 address, got %s\n", flag, value);
                exit(2);
            }
        } else if (!strcmp(flag, "--first")) opt.first = number(flag, value, 1, 65535);
        else if (!strcmp(flag, "--count")) opt.count = number(flag, value, 1, 65535);
        else if (!strcmp(flag, "--src-first")) opt.src_first = number(flag, value, 1, 65535);
        else if (!strcmp(flag, "--sockets")) opt.sockets = number(flag, value, 1, 10000);
        else if (!strcmp(flag, "--pps")) opt.pps = number(flag, value, 1, 10000000);
        else if (!strcmp(flag, "--duration-ms")) opt.duration_ms = number(flag, value, 1, 600000);
        else if (!strcmp(flag, "--timeout-ms")) opt.timeout_ms = number(flag, value, 1, 60000);
        else if (!strcmp(flag, "--payload-bytes"))
            opt.payload_bytes = number(flag, value, 1, MAX_DATAGRAM_BYTES);
        else if (!strcmp(flag, "--port") && opt.n_probes < MAX_PROBES)
            opt.probe_ports[opt.n_probes++] = number(flag, value, 1, 65535);
        else {
            fprintf(stderr, "udpecho: unknown or repeated-too-often option %s\n", flag);
            exit(2);
        }
    }
    if (opt.first + opt.count - 1 > 65535 || opt.src_first + opt.sockets - 1 > 65535) {
        fprintf(stderr, "udpecho: --first + --count or --src-first + --sockets runs past 65535\n");
        exit(2);
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: udpecho echo|probe|load [options] (see udpecho.c)\n");
        return 2;
    }
    parse(argc, argv);
    memset(payload, 'v', sizeof payload);
    if (!strcmp(argv[1], "echo")) return run_echo();
    if (!strcmp(argv[1], "probe")) return run_probe();
    if (!strcmp(argv[1], "load")) return run_load();
    fprintf(stderr, "udpecho: unknown mode %s\n", argv[1]);
    return 2;
}
