/*
 * membrane-cni: the CNI plugin a container runtime executes on a node, as a small static binary
 * that needs nothing of the host (no Python, no virtualenv). It forwards the invocation to the
 * node's datapath agent and relays the answer:
 *
 *   runtime --(CNI_* environment, network configuration on stdin)--> this program
 *   this program --(one JSON line: {"op": "cni", "body": {"env": {...}, "config": "..."}})-->
 *       the agent's unix socket ($MEMBRANE_AGENT_SOCKET, else /run/membrane/<node>/agent.sock,
 *       <node> being the lowercased host name, as Kubernetes names nodes)
 *   agent --(one JSON line: {"result": {"status": N, "output": "..."}})--> this program
 *   this program: prints output on stdout, exits with status.
 *
 * All CNI logic (validation, error codes, the result document) is the agent's, in
 * shared/cni.py, the same code as the Python plugin: this program only carries bytes. When the
 * agent cannot be reached it prints CNI error 11 ("try again later") itself.
 *
 * Build: gcc -O2 -static -o membrane-cni cni/membrane-cni.c (make setup and the Dockerfile do).
 */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <unistd.h>

#define MAX_INPUT (1 << 20)
#define TIMEOUT_S 60

extern char **environ;

struct buf {
	char *data;
	size_t len, cap;
};

static void put(struct buf *b, const char *s, size_t n)
{
	if (b->len + n + 1 > b->cap) {
		size_t cap = b->cap ? b->cap : 4096;
		while (b->len + n + 1 > cap)
			cap *= 2;
		char *grown = realloc(b->data, cap);
		if (!grown) {
			fputs("membrane-cni: out of memory\n", stderr);
			exit(1);
		}
		b->data = grown;
		b->cap = cap;
	}
	memcpy(b->data + b->len, s, n);
	b->len += n;
	b->data[b->len] = '\0';
}

static void puts_(struct buf *b, const char *s) { put(b, s, strlen(s)); }

/* a JSON string literal of s[0..n) */
static void put_string(struct buf *b, const char *s, size_t n)
{
	char esc[8];
	puts_(b, "\"");
	for (size_t i = 0; i < n; i++) {
		unsigned char c = (unsigned char)s[i];
		if (c == '"' || c == '\\') {
			esc[0] = '\\';
			esc[1] = (char)c;
			put(b, esc, 2);
		} else if (c < 0x20) {
			snprintf(esc, sizeof esc, "\\u%04x", c);
			put(b, esc, 6);
		} else {
			put(b, (const char *)&s[i], 1);
		}
	}
	puts_(b, "\"");
}

/* the answer when the agent is not there: CNI's "try again later" */
static int fail(const char *msg, const char *details)
{
	struct buf out = {0};
	puts_(&out, "{\"cniVersion\": \"1.0.0\", \"code\": 11, \"msg\": ");
	put_string(&out, msg, strlen(msg));
	puts_(&out, ", \"details\": ");
	put_string(&out, details, strlen(details));
	puts_(&out, "}\n");
	fputs(out.data, stdout);
	fprintf(stderr, "membrane-cni: %s: %s\n", msg, details);
	return 1;
}

/* the value of the JSON string that starts at *p (just after its opening quote), decoded */
static int read_string(const char **p, struct buf *out)
{
	const char *s = *p;
	while (*s && *s != '"') {
		if (*s != '\\') {
			put(out, s++, 1);
			continue;
		}
		s++;
		char c = *s++;
		char one = c;
		switch (c) {
		case 'n': one = '\n'; break;
		case 't': one = '\t'; break;
		case 'r': one = '\r'; break;
		case 'b': one = '\b'; break;
		case 'f': one = '\f'; break;
		case 'u': {
			char hex[5] = {0};
			for (int i = 0; i < 4; i++) {
				if (!isxdigit((unsigned char)s[i]))
					return -1;
				hex[i] = s[i];
			}
			s += 4;
			unsigned long cp = strtoul(hex, NULL, 16);
			char utf8[3];
			if (cp < 0x80) {
				utf8[0] = (char)cp;
				put(out, utf8, 1);
			} else if (cp < 0x800) {
				utf8[0] = (char)(0xc0 | (cp >> 6));
				utf8[1] = (char)(0x80 | (cp & 0x3f));
				put(out, utf8, 2);
			} else {
				utf8[0] = (char)(0xe0 | (cp >> 12));
				utf8[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
				utf8[2] = (char)(0x80 | (cp & 0x3f));
				put(out, utf8, 3);
			}
			continue;
		}
		case '"': case '\\': case '/': break;
		default: return -1;
		}
		put(out, &one, 1);
	}
	if (*s != '"')
		return -1;
	*p = s + 1;
	return 0;
}

static const char *after_key(const char *json, const char *key)
{
	const char *at = strstr(json, key);
	if (!at)
		return NULL;
	at += strlen(key);
	while (*at == ' ' || *at == ':')
		at++;
	return at;
}

static void socket_path(char *path, size_t size)
{
	const char *given = getenv("MEMBRANE_AGENT_SOCKET");
	if (given && *given) {
		snprintf(path, size, "%s", given);
		return;
	}
	struct utsname host;
	uname(&host);
	for (char *c = host.nodename; *c; c++)
		*c = (char)tolower((unsigned char)*c);
	snprintf(path, size, "/run/membrane/%s/agent.sock", host.nodename);
}

int main(void)
{
	struct buf config = {0}, request = {0}, reply = {0};
	char chunk[65536];
	ssize_t n;
	const char *command = getenv("CNI_COMMAND");

	/* VERSION reads no configuration; everything else does */
	if (!command || strcmp(command, "VERSION") != 0) {
		while ((n = read(0, chunk, sizeof chunk)) > 0) {
			put(&config, chunk, (size_t)n);
			if (config.len > MAX_INPUT)
				return fail("the network configuration is too large", "over 1 MiB");
		}
	}
	puts_(&request, "{\"op\": \"cni\", \"body\": {\"env\": {");
	int first = 1;
	for (char **e = environ; *e; e++) {
		/* the CNI_* variables, and membrane's own (log level, socket) */
		if (strncmp(*e, "CNI_", 4) != 0 && strncmp(*e, "MEMBRANE_", 9) != 0)
			continue;
		const char *eq = strchr(*e, '=');
		if (!eq)
			continue;
		if (!first)
			puts_(&request, ", ");
		first = 0;
		put_string(&request, *e, (size_t)(eq - *e));
		puts_(&request, ": ");
		put_string(&request, eq + 1, strlen(eq + 1));
	}
	puts_(&request, "}, \"config\": ");
	put_string(&request, config.data ? config.data : "", config.len);
	puts_(&request, "}}\n");

	char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
	socket_path(path, sizeof path);
	int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	snprintf(addr.sun_path, sizeof addr.sun_path, "%s", path);
	struct timeval timeout = {.tv_sec = TIMEOUT_S};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof timeout);
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof timeout);
	if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
		char details[512];
		snprintf(details, sizeof details,
			 "is the membrane datapath agent running on this node? %s: %s", path,
			 strerror(errno));
		return fail("no datapath agent", details);
	}
	for (size_t sent = 0; sent < request.len; sent += (size_t)n) {
		n = write(fd, request.data + sent, request.len - sent);
		if (n <= 0)
			return fail("lost the datapath agent", strerror(errno));
	}
	while ((n = read(fd, chunk, sizeof chunk)) > 0) {
		put(&reply, chunk, (size_t)n);
		if (memchr(chunk, '\n', (size_t)n))
			break;
	}
	close(fd);
	if (!reply.data)
		return fail("the datapath agent did not answer", path);

	const char *status = after_key(reply.data, "\"status\"");
	const char *output = after_key(reply.data, "\"output\"");
	if (!status || !output || *output != '"') {
		const char *message = after_key(reply.data, "\"message\"");
		struct buf text = {0};
		if (message && *message == '"') {
			message++;
			read_string(&message, &text);
		}
		return fail("the datapath agent refused the request", text.data ? text.data : reply.data);
	}
	struct buf text = {0};
	output++;
	if (read_string(&output, &text) < 0)
		return fail("the datapath agent's answer is not readable", reply.data);
	if (text.data)
		fputs(text.data, stdout);
	return (int)strtol(status, NULL, 10);
}
