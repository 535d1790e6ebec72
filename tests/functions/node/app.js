// The Node.js test fixture function of the `function` handler kind (issue
// 16): an ordinary Lambda handler run by aws-lambda-ric (`aws-lambda-ric
// app.handler`). The Python and Rust fixtures behave the same way:
//
// - the event is a Kinesis (`Records[0].kinesis`), SQS (`Records[0].body`)
//   or self-managed Kafka (top-level `records`) event; an empty `Records`
//   list has nothing to do;
// - per record, by its text: `poison` -> named in `batchItemFailures`;
//   `throw` -> the invocation throws; `crash` -> the process exits with
//   status 3 the first time (a marker file under `$MARKERS` remembers);
//   `slow` -> sleeps 30 s the first time; anything else (and crash or slow
//   after the first time) -> `text\n` appended to `$RECEIPTS`;
// - one stdout line per invocation, `handled N records`;
// - `FAIL_INIT` set and non-empty -> loading the module throws, which the
//   runtime client reports as an init error.
"use strict";

const fs = require("node:fs");
const path = require("node:path");

if (process.env.FAIL_INIT) {
  throw new Error(`init failed: FAIL_INIT=${process.env.FAIL_INIT}`);
}

exports.handler = async (event) => {
  const items = recordsOf(event);
  const batchItemFailures = [];
  for (const { id, text } of items) {
    if (text.includes("poison")) {
      batchItemFailures.push({ itemIdentifier: id });
      continue;
    }
    if (text.includes("throw")) {
      throw new TypeError(`throw record ${text}`);
    }
    if (text.includes("crash") && firstTime("crash", text)) {
      // At once, as a segfault or an OOM kill would: no reply, no flush.
      process.exit(3);
    }
    if (text.includes("slow") && firstTime("slow", text)) {
      await new Promise((resolve) => setTimeout(resolve, 30_000));
    }
    receipt(text);
  }
  // Not console.log: the runtime client prefixes that with a timestamp,
  // request id and level, and the fixtures print the same line everywhere.
  process.stdout.write(`handled ${items.length} records\n`);
  return { batchItemFailures };
};

// The records of whichever event this is, in order, as { id, text }.
function recordsOf(event) {
  const records = event.Records;
  if (Array.isArray(records) && records.length > 0) {
    const first = records[0];
    if (first.kinesis !== undefined) {
      return records.map((r) => ({
        id: r.kinesis.sequenceNumber,
        text: Buffer.from(r.kinesis.data, "base64").toString("utf8"),
      }));
    }
    if (first.body !== undefined) {
      return records.map((r) => ({ id: r.messageId, text: r.body }));
    }
    throw new Error(`an event this function does not handle: ${JSON.stringify(first)}`);
  }
  if (Array.isArray(records)) {
    return [];
  }
  if (event.records !== null && typeof event.records === "object") {
    // One topic-partition per event from an event source mapping; sorted so
    // that more than one would still be handled in a fixed order.
    return Object.keys(event.records)
      .sort()
      .flatMap((key) =>
        event.records[key].map((r) => ({
          id: String(r.offset),
          text: r.value == null ? "" : Buffer.from(r.value, "base64").toString("utf8"),
        })),
      );
  }
  throw new Error(`an event this function does not handle: ${JSON.stringify(event)}`);
}

// Whether this is the first time `kind` meets `text`; marks it if so.
function firstTime(kind, text) {
  // Per code point (the `u` flag), as the Python and Rust fixtures count.
  const name = text.replace(/[^A-Za-z0-9]/gu, "_");
  const marker = path.join(env("MARKERS"), `${kind}-${name}`);
  try {
    // Exclusive create: of two processes meeting the record at once,
    // exactly one takes the first time.
    fs.closeSync(fs.openSync(marker, "wx"));
    return true;
  } catch (e) {
    if (e.code === "EEXIST") return false;
    throw e;
  }
}

// One write on an O_APPEND descriptor, so that concurrent processes
// appending to the same file never interleave inside a line.
function receipt(text) {
  fs.appendFileSync(env("RECEIPTS"), `${text}\n`);
}

function env(name) {
  const value = process.env[name];
  if (value === undefined) throw new Error(`environment variable ${name} is not set`);
  return value;
}
