// A TLS client that does not use the host's libssl: the JDK's own TLS
// (JSSE), written in Java. Run it as a single-file source program:
//
//   java tests/clients/JavaClient.java HOST PORT CAFILE SNI SECRET [COUNT]
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

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetAddress;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.GeneralSecurityException;
import java.security.KeyStore;
import java.security.cert.Certificate;
import java.security.cert.CertificateFactory;
import java.util.List;
import java.util.Locale;
import javax.net.ssl.SNIHostName;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLParameters;
import javax.net.ssl.SSLSocket;
import javax.net.ssl.SSLSocketFactory;
import javax.net.ssl.TrustManagerFactory;

public class JavaClient {
    static final int TIMEOUT_MS = 20000;
    static final int BODY_BYTES = 700;

    public static void main(String[] argv) {
        try {
            run(argv);
        } catch (Exception e) {
            System.err.println("JavaClient: " + e);
            System.exit(1);
        }
    }

    static void run(String[] argv) throws Exception {
        if (argv.length < 5 || argv.length > 6) {
            throw new IllegalArgumentException(
                    "usage: JavaClient.java HOST PORT CAFILE SNI SECRET [COUNT]");
        }
        String host = argv[0];
        int port = Integer.parseInt(argv[1]);
        String sni = argv[3];
        String secret = argv[4];
        int count = argv.length == 6 ? Integer.parseInt(argv[5]) : 1;
        if (!secret.matches("[\\x20-\\x7e&&[^\"\\\\]]*")) {
            throw new IllegalArgumentException(
                    "SECRET must be printable ASCII without quotes or backslashes");
        }
        String hold = System.getenv().getOrDefault("TOKTRA_CLIENT_HOLD_S", "0");
        long holdMillis = (long) (Double.parseDouble(hold) * 1000);

        SSLSocketFactory factory = trusting(Path.of(argv[2])).getSocketFactory();
        byte[] request = request(sni, secret);
        long pid = ProcessHandle.current().pid();
        for (int i = 0; i < count; i++) {
            int localPort = post(factory, host, port, sni, request);
            System.out.println(String.format(Locale.ROOT,
                    "{\"pid\":%d,\"local_port\":%d,\"sni\":%s}",
                    pid, localPort, jsonString(sni)));
            System.out.flush();
        }
        if (holdMillis > 0) {
            Thread.sleep(holdMillis);
        }
    }

    // A TLS context that trusts only the certificates in the PEM file.
    static SSLContext trusting(Path caFile) throws IOException, GeneralSecurityException {
        KeyStore store = KeyStore.getInstance(KeyStore.getDefaultType());
        store.load(null, null);
        CertificateFactory x509 = CertificateFactory.getInstance("X.509");
        int n = 0;
        try (InputStream in = Files.newInputStream(caFile)) {
            for (Certificate cert : x509.generateCertificates(in)) {
                store.setCertificateEntry("ca" + n++, cert);
            }
        }
        if (n == 0) {
            throw new GeneralSecurityException("no certificate in " + caFile);
        }
        TrustManagerFactory tmf =
                TrustManagerFactory.getInstance(TrustManagerFactory.getDefaultAlgorithm());
        tmf.init(store);
        SSLContext ctx = SSLContext.getInstance("TLS");
        ctx.init(null, tmf.getTrustManagers(), null);
        return ctx;
    }

    // The same body as the Node and Go clients send: the secret in a JSON
    // object, padded to BODY_BYTES when it is short enough.
    static byte[] request(String sni, String secret) {
        String head = "{\"prompt\":\"" + secret + "\",\"pad\":\"";
        String tail = "\"}";
        String body = head + "x".repeat(Math.max(0, BODY_BYTES - head.length() - tail.length()))
                + tail;
        String text = "POST /v1/chat HTTP/1.1\r\n"
                + "Host: " + sni + "\r\n"
                + "Connection: close\r\n"
                + "Content-Type: application/json\r\n"
                + "Content-Length: " + body.length() + "\r\n\r\n"
                + body;
        return text.getBytes(StandardCharsets.US_ASCII);
    }

    // One connection and one request; returns the source port once the
    // whole response has been read and the connection closed.
    static int post(SSLSocketFactory factory, String host, int port, String sni, byte[] request)
            throws IOException {
        try (Socket raw = new Socket()) {
            raw.connect(new InetSocketAddress(InetAddress.getByName(host), port), TIMEOUT_MS);
            raw.setSoTimeout(TIMEOUT_MS);
            // Layered on the connected socket under the name SNI, JSSE checks
            // the certificate against SNI only. A socket opened on the address
            // would accept a certificate valid for the address instead.
            try (SSLSocket tls = (SSLSocket) factory.createSocket(raw, sni, port, true)) {
                SSLParameters params = tls.getSSLParameters();
                params.setServerNames(List.of(new SNIHostName(sni)));
                params.setEndpointIdentificationAlgorithm("HTTPS");
                tls.setSSLParameters(params);
                tls.startHandshake();
                OutputStream out = tls.getOutputStream();
                out.write(request);
                out.flush();
                readResponse(tls.getInputStream());
                return raw.getLocalPort();
            }
        }
    }

    // Reads the head, then exactly Content-Length bytes of body: the server
    // keeps the connection open until the client closes it.
    static void readResponse(InputStream in) throws IOException {
        ByteArrayOutputStream head = new ByteArrayOutputStream();
        int matched = 0;
        while (matched < 4) {
            int b = in.read();
            if (b < 0) {
                throw new IOException("server closed before the end of the response head");
            }
            head.write(b);
            matched = (b == "\r\n\r\n".charAt(matched)) ? matched + 1 : (b == '\r' ? 1 : 0);
        }
        String text = head.toString(StandardCharsets.ISO_8859_1);
        if (!text.startsWith("HTTP/1.1 200 ")) {
            throw new IOException("server answered " + text.lines().findFirst().orElse(""));
        }
        long length = -1;
        for (String line : text.split("\r\n")) {
            int colon = line.indexOf(':');
            if (colon > 0 && line.substring(0, colon).trim().equalsIgnoreCase("Content-Length")) {
                length = Long.parseLong(line.substring(colon + 1).trim());
            }
        }
        if (length < 0) {
            throw new IOException("response without Content-Length");
        }
        byte[] buf = new byte[8192];
        while (length > 0) {
            int n = in.read(buf, 0, (int) Math.min(buf.length, length));
            if (n < 0) {
                throw new IOException("server closed mid-body, " + length + " bytes short");
            }
            length -= n;
        }
    }

    static String jsonString(String s) {
        StringBuilder out = new StringBuilder("\"");
        for (char c : s.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20 || c > 0x7e) {
                out.append(String.format(Locale.ROOT, "\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }
}
