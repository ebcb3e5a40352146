// Command goclient is a TLS client that does not use the host's libssl:
// Go's crypto/tls, in a static binary (built with CGO_ENABLED=0).
//
// usage: goclient HOST PORT CAFILE SNI SECRET [COUNT]
//
// It makes COUNT (default 1) HTTP/1.1 POSTs one after the other, each on a
// new connection to HOST:PORT that asks for SNI and verifies the server's
// certificate against CAFILE for that name. It prints one JSON line per
// connection: {"pid", "local_port", "sni"}. It exits 1 with a message on
// the first error.
//
// TOKTRA_CLIENT_HOLD_S=N keeps the process alive N more seconds after the
// last line is printed, so a test can look at it (/proc/PID/maps) once its
// TLS stack has certainly been used.
package main

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"
)

const (
	timeout   = 20 * time.Second
	bodyBytes = 700
)

type options struct {
	host, port, sni, secret string
	count                   int
	hold                    time.Duration
	roots                   *x509.CertPool
}

type line struct {
	Pid       int    `json:"pid"`
	LocalPort int    `json:"local_port"`
	SNI       string `json:"sni"`
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "goclient: "+format+"\n", args...)
	os.Exit(1)
}

func parseArgs(argv []string) options {
	if len(argv) < 5 || len(argv) > 6 {
		fail("usage: goclient HOST PORT CAFILE SNI SECRET [COUNT]")
	}
	opts := options{host: argv[0], port: argv[1], sni: argv[3], secret: argv[4], count: 1}
	if _, err := strconv.ParseUint(opts.port, 10, 16); err != nil {
		fail("PORT must be a port number, not %q", opts.port)
	}
	for _, c := range opts.secret {
		if c < 0x20 || c > 0x7e || c == '"' || c == '\\' {
			fail("SECRET must be printable ASCII without quotes or backslashes")
		}
	}
	if len(argv) == 6 {
		n, err := strconv.Atoi(argv[5])
		if err != nil || n < 0 {
			fail("COUNT must be a whole number, not %q", argv[5])
		}
		opts.count = n
	}
	if s := os.Getenv("TOKTRA_CLIENT_HOLD_S"); s != "" {
		seconds, err := strconv.ParseFloat(s, 64)
		if err != nil || seconds < 0 {
			fail("TOKTRA_CLIENT_HOLD_S must be a number of seconds, not %q", s)
		}
		opts.hold = time.Duration(seconds * float64(time.Second))
	}
	pem, err := os.ReadFile(argv[2])
	if err != nil {
		fail("%v", err)
	}
	opts.roots = x509.NewCertPool()
	if !opts.roots.AppendCertsFromPEM(pem) {
		fail("no certificate in %s", argv[2])
	}
	return opts
}

// requestBody is the same body as the Node and Java clients send: the
// secret in a JSON object, padded to bodyBytes when it is short enough.
func requestBody(secret string) string {
	head := `{"prompt":"` + secret + `","pad":"`
	tail := `"}`
	pad := bodyBytes - len(head) - len(tail)
	if pad < 0 {
		pad = 0
	}
	return head + strings.Repeat("x", pad) + tail
}

// post makes one connection and one request; it returns the source port
// once the whole response has been read and the connection closed.
func post(opts options, body string) (int, error) {
	dialer := &net.Dialer{Timeout: timeout}
	conn, err := tls.DialWithDialer(dialer, "tcp", net.JoinHostPort(opts.host, opts.port),
		&tls.Config{ServerName: opts.sni, RootCAs: opts.roots})
	if err != nil {
		return 0, err
	}
	defer conn.Close()
	if err := conn.SetDeadline(time.Now().Add(timeout)); err != nil {
		return 0, err
	}
	request := "POST /v1/chat HTTP/1.1\r\n" +
		"Host: " + opts.sni + "\r\n" +
		"Connection: close\r\n" +
		"Content-Type: application/json\r\n" +
		"Content-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
	if _, err := io.WriteString(conn, request); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return 0, err
	}
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return 0, err
	}
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("server answered %s", resp.Status)
	}
	port := conn.LocalAddr().(*net.TCPAddr).Port
	return port, conn.Close()
}

func main() {
	opts := parseArgs(os.Args[1:])
	body := requestBody(opts.secret)
	out := json.NewEncoder(os.Stdout)
	for i := 0; i < opts.count; i++ {
		port, err := post(opts, body)
		if err != nil {
			fail("%v", err)
		}
		if err := out.Encode(line{os.Getpid(), port, opts.sni}); err != nil {
			fail("%v", err)
		}
	}
	time.Sleep(opts.hold)
}
