// A TLS client that does not use the host's libssl: Node's own https
// module, whose OpenSSL is built into the node binary (the nodesource and
// upstream builds; Debian's nodejs links the system libssl instead).
//
// usage: node nodeclient.js HOST PORT CAFILE SNI SECRET [COUNT]
//
// Makes COUNT (default 1) HTTPS POSTs one after the other, each on a new
// connection to HOST:PORT that asks for SNI and verifies the server's
// certificate against CAFILE for that name. Prints one JSON line per
// connection: {"pid", "local_port", "sni"}. Exits 1 with a message on the
// first error.
//
// TOKTRA_CLIENT_HOLD_S=N keeps the process alive N more seconds after the
// last line is printed, so a test can look at it (/proc/PID/maps) once
// its TLS stack has certainly been used.

"use strict";

const fs = require("fs");
const https = require("https");

const TIMEOUT_MS = 20000;
const BODY_BYTES = 700;

function fail(message) {
  process.stderr.write(`nodeclient: ${message}\n`);
  process.exit(1);
}

function parseArgs(argv) {
  if (argv.length < 5 || argv.length > 6) {
    fail("usage: nodeclient.js HOST PORT CAFILE SNI SECRET [COUNT]");
  }
  const [host, port, caFile, sni, secret, count = "1"] = argv;
  if (!/^[\x20-\x7e]*$/.test(secret) || /["\\]/.test(secret)) {
    fail("SECRET must be printable ASCII without quotes or backslashes");
  }
  const hold = Number(process.env.TOKTRA_CLIENT_HOLD_S || "0");
  if (!Number.isInteger(Number(port)) || !Number.isInteger(Number(count))) {
    fail(`PORT and COUNT must be integers, not ${port} and ${count}`);
  }
  if (!(hold >= 0)) {
    fail(`TOKTRA_CLIENT_HOLD_S must be a number of seconds, not ${hold}`);
  }
  return { host, port: Number(port), caFile, sni, secret, count: Number(count), hold };
}

// The same body as the Go and Java clients: the secret in a JSON object,
// padded to BODY_BYTES when the secret is short enough.
function requestBody(secret) {
  const head = `{"prompt":"${secret}","pad":"`;
  const tail = '"}';
  const pad = "x".repeat(Math.max(0, BODY_BYTES - head.length - tail.length));
  return Buffer.from(head + pad + tail);
}

// One connection: resolves with the source port once the whole response
// has been read; rejects on any error or after TIMEOUT_MS.
function post(args, ca, body) {
  return new Promise((resolve, reject) => {
    let localPort = null;
    const req = https.request({
      host: args.host,
      port: args.port,
      servername: args.sni,
      ca,
      agent: false, // a fresh connection each time, never pooled
      method: "POST",
      path: "/v1/chat",
      headers: {
        Host: args.sni,
        Connection: "close",
        "Content-Type": "application/json",
        "Content-Length": body.length,
      },
    });
    req.setTimeout(TIMEOUT_MS, () => {
      req.destroy(new Error(`no answer within ${TIMEOUT_MS} ms`));
    });
    // Read now: once the response ends the socket is closed and forgets it.
    req.on("socket", (socket) => {
      socket.on("secureConnect", () => {
        localPort = socket.localPort;
      });
    });
    req.on("error", reject);
    req.on("response", (res) => {
      res.on("data", () => {});
      res.on("error", reject);
      res.on("end", () => {
        if (res.statusCode !== 200) {
          reject(new Error(`server answered ${res.statusCode}`));
        } else if (localPort === null) {
          reject(new Error("response without a TLS handshake"));
        } else {
          // Connection: close: the client closes the socket itself now.
          resolve(localPort);
        }
      });
    });
    req.end(body);
  });
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const ca = fs.readFileSync(args.caFile);
  const body = requestBody(args.secret);
  for (let i = 0; i < args.count; i++) {
    const localPort = await post(args, ca, body);
    process.stdout.write(
      JSON.stringify({ pid: process.pid, local_port: localPort, sni: args.sni }) + "\n",
    );
  }
  if (args.hold > 0) {
    await new Promise((resolve) => setTimeout(resolve, args.hold * 1000));
  }
}

main().catch((err) => fail(err.message));
