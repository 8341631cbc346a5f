/*
 * loopback-floor.c: what one small loopback TCP send costs this machine's
 * kernel, with no chat code at all: the floor under a fan-out delivery.
 *
 * A fan-out at a low rate writes one frame per recipient per message, so
 * each delivery is one send() on its own socket, and on loopback the
 * sender's send() also runs the receiving side's TCP input (softirq).
 * This program opens N connected pairs on 127.0.0.1, forks a receiver that
 * epoll-reads every client end, and sends R rounds of one 100-byte write
 * to each server end (TCP_NODELAY, as the node sets), 200 ms apart, like a
 * message's walk over N members. It prints the sender's and the
 * receiver's CPU (user + system, getrusage) per message.
 *
 *   cc -O2 -o /tmp/loopback-floor scripts/loopback-floor.c
 *   (ulimit -n 20000; /tmp/loopback-floor 5000 10)
 *
 * Arguments: N pairs (1..9000: two descriptors each, under the 20,000
 * open-file limit), R rounds (1..100), optional port (default 18777).
 * Bounded: N * R sends, then the receiver exits when it has read them all
 * or after 5 s without data. Only 127.0.0.1.
 *
 * Owner: docs/benchmarks.md (round 29 reads it against the node's CPU per
 * delivery). Never used by tests.
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static double cpu_secs(void) {
    struct rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_utime.tv_sec + r.ru_utime.tv_usec / 1e6 + r.ru_stime.tv_sec +
           r.ru_stime.tv_usec / 1e6;
}

static int fail(const char *what) {
    perror(what);
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s PAIRS ROUNDS [PORT]\n", argv[0]);
        return 2;
    }
    int n = atoi(argv[1]), rounds = atoi(argv[2]);
    int port = argc > 3 ? atoi(argv[3]) : 18777;
    if (n < 1 || n > 9000 || rounds < 1 || rounds > 100 || port < 1 || port > 65535) {
        fprintf(stderr, "PAIRS 1..9000, ROUNDS 1..100, PORT 1..65535\n");
        return 2;
    }
    int one = 1;
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {0};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096))
        return fail("listen");
    int *client = malloc(n * sizeof *client), *server = malloc(n * sizeof *server);
    if (!client || !server)
        return fail("malloc");
    for (int i = 0; i < n; i++) {
        client[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (client[i] < 0 || connect(client[i], (struct sockaddr *)&a, sizeof a))
            return fail("connect (is ulimit -n at least 2 * PAIRS + 10?)");
        server[i] = accept(ls, NULL, NULL);
        if (server[i] < 0)
            return fail("accept");
        setsockopt(server[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(client[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    long total = (long)n * rounds;
    pid_t child = fork();
    if (child < 0)
        return fail("fork");
    if (child == 0) {
        for (int i = 0; i < n; i++)
            close(server[i]);
        int ep = epoll_create1(0);
        for (int i = 0; i < n; i++) {
            struct epoll_event e = {.events = EPOLLIN, .data.fd = client[i]};
            epoll_ctl(ep, EPOLL_CTL_ADD, client[i], &e);
        }
        long got = 0, want = total * 100, waits = 0;
        char buf[4096];
        struct epoll_event ev[256];
        double c0 = cpu_secs();
        while (got < want) {
            int k = epoll_wait(ep, ev, 256, 5000);
            waits++;
            if (k <= 0)
                break;
            for (int j = 0; j < k; j++) {
                ssize_t r = read(ev[j].data.fd, buf, sizeof buf);
                if (r > 0)
                    got += r;
            }
        }
        printf("receiver: %.2f us CPU a message, %.2f epoll_wait calls a message%s\n",
               (cpu_secs() - c0) / total * 1e6, (double)waits / total,
               got < want ? " (stopped early: data missing)" : "");
        return got < want;
    }
    for (int i = 0; i < n; i++)
        close(client[i]);
    char msg[100];
    memset(msg, 'x', sizeof msg);
    sleep(1);
    double c0 = cpu_secs();
    for (int r = 0; r < rounds; r++) {
        for (int i = 0; i < n; i++)
            if (send(server[i], msg, sizeof msg, 0) != (ssize_t)sizeof msg)
                return fail("send");
        usleep(200000);
    }
    printf("sender:   %.2f us CPU a send (%d pairs x %d rounds)\n",
           (cpu_secs() - c0) / total * 1e6, n, rounds);
    int status = 0;
    waitpid(child, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
