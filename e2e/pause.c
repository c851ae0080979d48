/* The pod sandbox ("pause") process of the e2e node, built by e2e/images.py into
 * localhost/kubellm/pause:<version> (there is no registry to pull registry.k8s.io/pause from).
 *
 * It holds the pod's namespaces: it sleeps until a signal arrives, exits 0 on SIGINT or SIGTERM,
 * and, being PID 1 when the pod shares its process namespace, reaps every child that is handed
 * to it on SIGCHLD. The same behaviour as Kubernetes' build/pause/linux/pause.c.
 *
 *   gcc -Os -static -o pause pause.c      (e2e/images.py adds -Wall -Werror and strips it)
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef VERSION
#define VERSION "unknown"
#endif

static void on_terminate(int sig) {
    (void)sig;
    _exit(0);
}

static void on_child(int sig) {
    (void)sig;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

static void install(int sig, void (*handler)(int), int flags) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = handler;
    action.sa_flags = flags;
    sigemptyset(&action.sa_mask);
    if (sigaction(sig, &action, NULL) < 0) {
        perror("pause: sigaction");
        exit(1);
    }
}

int main(int argc, char **argv) {
    if (argc > 1 && (strcmp(argv[1], "-v") == 0 || strcmp(argv[1], "--version") == 0)) {
        printf("pause (kubellm e2e) %s\n", VERSION);
        return 0;
    }
    if (getpid() != 1) {
        /* Not an error: useful to try it by hand, but say what it is for. */
        fprintf(stderr, "pause: should be the first process of a pod sandbox\n");
    }
    install(SIGINT, on_terminate, 0);
    install(SIGTERM, on_terminate, 0);
    install(SIGCHLD, on_child, SA_NOCLDSTOP | SA_RESTART);
    for (;;) {
        pause();
    }
    return 42; /* not reached */
}
