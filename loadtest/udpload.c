/*
 * udpload: the benchmark's load generator and sink, fast enough not to be the bottleneck.
 *
 * Works on UDP sockets it inherits from the Python harness (which binds them, authenticates
 * the clients with STUN and knows every address), so this program carries only datagrams.
 *
 * flood: keep up to --window datagrams in flight through a forwarder (refilled in bulk below
 *        half the window), round robin over the flows
 *        (--burst datagrams per flow in a row), sendmmsg out and recvmmsg in; a sink counts
 *        datagrams of exactly --expect-bytes. Packets that never arrive are written off after
 *        STALL_MS so a lossy forwarder cannot stall the run.
 *   udpload flood --duration-ms D --window W --burst B --payload-bytes P --expect-bytes E
 *                 --sink FD ... --flow FD,IP,PORT[,HEXPREFIX] ...
 *   prints {"sent": .., "received": .., "written_off": .., "elapsed_s": ..}
 *
 * ping:  one datagram at a time; each round pings every --path once, starting with a
 *        different path each round (interleaved, so all paths see the same conditions), and
 *        echoes datagrams that arrive on the --echo sockets back to their source.
 *   udpload ping --rounds N --payload-bytes P --timeout-ms T --echo FD ...
 *                --path NAME,FD,IP,PORT ...
 *   prints {"rtt_ns": {"NAME": [..], ..}, "lost": {"NAME": n, ..}}
 *
 * IPv4 only. Built by loadtest/native.py with gcc -O2.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 64
#define MAX_FLOWS 1024
#define MAX_SINKS 1024
#define MAX_PREFIX_BYTES 64
#define MAX_DATAGRAM_BYTES 2048
#define STALL_MS 50
#define DRAIN_MS 300
#define HEADER_BYTES 20

struct flow {
    int fd;
    struct sockaddr_in dest;
    uint8_t prefix[MAX_PREFIX_BYTES];
    size_t prefix_len;
};

struct options {
    long duration_ms, window, burst, payload_bytes, expect_bytes, rounds, timeout_ms;
    int sinks[MAX_SINKS], n_sinks;
    struct flow flows[MAX_FLOWS];
    char names[MAX_FLOWS][32];
    int n_flows;
};

static struct options opt = {.duration_ms = 2000, .window = 128, .burst = 8,
                             .payload_bytes = 200, .rounds = 1000, .timeout_ms = 100};
static uint8_t payload[MAX_DATAGRAM_BYTES];

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int nonblocking(int fd) {
    return fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
}

static size_t parse_hex(const char *hex, uint8_t *out, size_t cap) {
    size_t n = 0;
    while (hex[0] && hex[1] && n < cap) {
        unsigned byte;
        if (sscanf(hex, "%2x", &byte) != 1) break;
        out[n++] = (uint8_t)byte;
        hex += 2;
    }
    return n;
}

/* FD,IP,PORT[,HEXPREFIX] or, with a name first, NAME,FD,IP,PORT. */
static int parse_flow(char *spec, int named) {
    struct flow *f = &opt.flows[opt.n_flows];
    char *field[5] = {0};
    int n = 0;
    for (char *tok = strtok(spec, ","); tok && n < 5; tok = strtok(NULL, ",")) field[n++] = tok;
    if (n < 3 + named || opt.n_flows >= MAX_FLOWS) return -1;
    if (named) snprintf(opt.names[opt.n_flows], sizeof opt.names[0], "%s", field[0]);
    f->fd = atoi(field[named]);
    f->dest.sin_family = AF_INET;
    f->dest.sin_port = htons((uint16_t)atoi(field[named + 2]));
    if (inet_pton(AF_INET, field[named + 1], &f->dest.sin_addr) != 1) return -1;
    f->prefix_len = (!named && n > 3) ? parse_hex(field[3], f->prefix, MAX_PREFIX_BYTES) : 0;
    opt.n_flows++;
    return nonblocking(f->fd);
}

static int parse_options(int argc, char **argv) {
    for (int i = 2; i + 1 < argc; i += 2) {
        const char *k = argv[i];
        char *v = argv[i + 1];
        if (!strcmp(k, "--duration-ms")) opt.duration_ms = atol(v);
        else if (!strcmp(k, "--window")) opt.window = atol(v);
        else if (!strcmp(k, "--burst")) opt.burst = atol(v);
        else if (!strcmp(k, "--payload-bytes")) opt.payload_bytes = atol(v);
        else if (!strcmp(k, "--expect-bytes")) opt.expect_bytes = atol(v);
        else if (!strcmp(k, "--rounds")) opt.rounds = atol(v);
        else if (!strcmp(k, "--timeout-ms")) opt.timeout_ms = atol(v);
        else if (!strcmp(k, "--sink") || !strcmp(k, "--echo")) {
            if (opt.n_sinks >= MAX_SINKS) return -1;
            opt.sinks[opt.n_sinks++] = atoi(v);
            nonblocking(atoi(v));
        } else if (!strcmp(k, "--flow") || !strcmp(k, "--path")) {
            if (parse_flow(v, !strcmp(k, "--path")) < 0) return -1;
        } else return -1;
    }
    return opt.n_flows > 0 && opt.payload_bytes > 8 && opt.payload_bytes <= 1400 ? 0 : -1;
}

/* ---- flood ---- */

static struct mmsghdr rx_msgs[BATCH], tx_msgs[BATCH];
static struct iovec rx_iov[BATCH], tx_iov[BATCH][2];
static uint8_t rx_data[BATCH][MAX_DATAGRAM_BYTES];
static long long sent, received, written_off;
static int next_flow, burst_left;

/* Up to `count` datagrams round robin over the flows; one sendmmsg per run of one socket. */
static void send_batch(int count) {
    int start = 0;
    for (int i = 0; i < count; i++) {
        struct flow *f = &opt.flows[next_flow];
        tx_iov[i][0] = (struct iovec){f->prefix, f->prefix_len};
        tx_iov[i][1] = (struct iovec){payload, (size_t)opt.payload_bytes};
        memset(&tx_msgs[i].msg_hdr, 0, sizeof tx_msgs[i].msg_hdr);
        tx_msgs[i].msg_hdr.msg_iov = tx_iov[i];
        tx_msgs[i].msg_hdr.msg_iovlen = 2;
        tx_msgs[i].msg_hdr.msg_name = &f->dest;
        tx_msgs[i].msg_hdr.msg_namelen = sizeof f->dest;
        int last = i + 1 == count;
        if (--burst_left <= 0) {
            burst_left = (int)opt.burst;
            next_flow = (next_flow + 1) % opt.n_flows;
        }
        if (last || opt.flows[next_flow].fd != f->fd) {
            int n = sendmmsg(f->fd, tx_msgs + start, (unsigned)(i + 1 - start), 0);
            sent += n > 0 ? n : 0;
            start = i + 1;
        }
    }
}

static void drain_sink(int fd) {
    for (int i = 0; i < BATCH; i++) {
        rx_iov[i] = (struct iovec){rx_data[i], MAX_DATAGRAM_BYTES};
        memset(&rx_msgs[i].msg_hdr, 0, sizeof rx_msgs[i].msg_hdr);
        rx_msgs[i].msg_hdr.msg_iov = &rx_iov[i];
        rx_msgs[i].msg_hdr.msg_iovlen = 1;
    }
    int n = recvmmsg(fd, rx_msgs, BATCH, MSG_DONTWAIT, NULL);
    for (int i = 0; i < n; i++) received += rx_msgs[i].msg_len == (unsigned)opt.expect_bytes;
}

static long long in_flight(void) {
    long long n = sent - received - written_off;
    return n > 0 ? n : 0;
}

/* Wait up to timeout_ms for sinks; true if any datagram was counted. */
static int collect(int epfd, int timeout_ms) {
    struct epoll_event events[64];
    long long before = received;
    int n = epoll_wait(epfd, events, 64, timeout_ms);
    for (int i = 0; i < n; i++) drain_sink(events[i].data.fd);
    return received > before;
}

static int flood(void) {
    int epfd = epoll_create1(0);
    for (int i = 0; i < opt.n_sinks; i++) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = opt.sinks[i]};
        epoll_ctl(epfd, EPOLL_CTL_ADD, opt.sinks[i], &ev);
    }
    burst_left = (int)opt.burst;
    int64_t start = now_ns(), end = start + opt.duration_ms * 1000000, last_rx = start;
    while (now_ns() < end) {
        /* Refill only below the low-water mark, so the forwarder always finds a deep queue
         * (its batching at saturation is what we measure), not one datagram per wake-up. */
        long long room = opt.window - in_flight();
        if (room >= opt.window / 2)
            for (; room > 0; room = opt.window - in_flight())
                send_batch(room < BATCH ? (int)room : BATCH);
        if (collect(epfd, opt.window - in_flight() < opt.window / 2 ? 5 : 0)) last_rx = now_ns();
        else if (now_ns() - last_rx > STALL_MS * 1000000LL) {
            written_off += in_flight();
            last_rx = now_ns();
        }
    }
    int64_t drain_end = now_ns() + DRAIN_MS * 1000000LL;
    while (sent > received && now_ns() < drain_end) collect(epfd, 5); /* written-off ones too */
    printf("{\"sent\": %lld, \"received\": %lld, \"written_off\": %lld, \"elapsed_s\": %.6f}\n",
           sent, received, written_off, (double)(now_ns() - start) / 1e9);
    return 0;
}

/* ---- ping ---- */

static void echo_all(int fd) {
    struct sockaddr_in from;
    for (int i = 0; i < BATCH; i++) {
        socklen_t len = sizeof from;
        ssize_t n = recvfrom(fd, rx_data[0], MAX_DATAGRAM_BYTES, MSG_DONTWAIT,
                             (struct sockaddr *)&from, &len);
        if (n < 0) return;
        if (n == opt.payload_bytes || n == opt.payload_bytes + HEADER_BYTES)
            sendto(fd, rx_data[0], (size_t)n, 0, (struct sockaddr *)&from, len);
    }
}

/* True once the reply carrying `seq` arrives on the path's socket. */
static int take_reply(int fd, uint64_t seq) {
    uint8_t buf[MAX_DATAGRAM_BYTES];
    ssize_t n;
    while ((n = recv(fd, buf, sizeof buf, MSG_DONTWAIT)) >= 0)
        if (n == opt.payload_bytes && !memcmp(buf + 4, &seq, sizeof seq)) return 1;
    return 0;
}

/* Round trip of one ping in ns, or -1 after the timeout. */
static int64_t ping_once(struct flow *path, uint64_t seq) {
    struct pollfd fds[MAX_SINKS + 1];
    for (int i = 0; i < opt.n_sinks; i++) fds[i] = (struct pollfd){opt.sinks[i], POLLIN, 0};
    fds[opt.n_sinks] = (struct pollfd){path->fd, POLLIN, 0};
    memcpy(payload + 4, &seq, sizeof seq);
    int64_t start = now_ns(), deadline = start + opt.timeout_ms * 1000000;
    sendto(path->fd, payload, (size_t)opt.payload_bytes, 0, (struct sockaddr *)&path->dest,
           sizeof path->dest);
    while (now_ns() < deadline) {
        if (poll(fds, (nfds_t)opt.n_sinks + 1, (int)((deadline - now_ns()) / 1000000) + 1) <= 0)
            continue;
        for (int i = 0; i < opt.n_sinks; i++)
            if (fds[i].revents & POLLIN) echo_all(opt.sinks[i]);
        if ((fds[opt.n_sinks].revents & POLLIN) && take_reply(path->fd, seq))
            return now_ns() - start;
    }
    return -1;
}

static int ping(void) {
    int64_t *rtt = calloc((size_t)(opt.rounds * opt.n_flows), sizeof *rtt);
    uint64_t seq = 0;
    for (long r = 0; r < opt.rounds; r++)
        for (int k = 0; k < opt.n_flows; k++) {
            int p = (int)((r + k) % opt.n_flows);
            rtt[r * opt.n_flows + p] = ping_once(&opt.flows[p], ++seq);
        }
    printf("{\"rtt_ns\": {");
    for (int p = 0; p < opt.n_flows; p++) {
        printf("%s\"%s\": [", p ? ", " : "", opt.names[p]);
        for (long r = 0, first = 1; r < opt.rounds; r++)
            if (rtt[r * opt.n_flows + p] >= 0) {
                printf("%s%lld", first ? "" : ",", (long long)rtt[r * opt.n_flows + p]);
                first = 0;
            }
        printf("]");
    }
    printf("}, \"lost\": {");
    for (int p = 0; p < opt.n_flows; p++) {
        long lost = 0;
        for (long r = 0; r < opt.rounds; r++) lost += rtt[r * opt.n_flows + p] < 0;
        printf("%s\"%s\": %ld", p ? ", " : "", opt.names[p], lost);
    }
    printf("}}\n");
    free(rtt);
    return 0;
}

int main(int argc, char **argv) {
    int is_flood = argc > 1 && !strcmp(argv[1], "flood");
    int is_ping = argc > 1 && !strcmp(argv[1], "ping");
    if ((!is_flood && !is_ping) || parse_options(argc, argv) < 0) {
        fprintf(stderr, "usage: udpload flood|ping [options] (see the comment in udpload.c)\n");
        return 2;
    }
    payload[0] = 0x80; /* RTP version 2: the relay forwards it as media (RFC 7983) */
    if (is_flood && opt.expect_bytes == 0) opt.expect_bytes = opt.payload_bytes;
    return is_flood ? flood() : ping();
}
