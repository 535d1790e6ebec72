"""The Python test fixture function of the `function` handler kind (issue 16).

An ordinary Lambda handler run by awslambdaric (`python -m awslambdaric
app.handler`); the Node.js and Rust fixtures behave the same way:

- the event is a Kinesis (`Records[0].kinesis`), SQS (`Records[0].body`) or
  self-managed Kafka (top-level `records`) event; an empty `Records` list has
  nothing to do;
- per record, by its text: `poison` -> named in `batchItemFailures`;
  `throw` -> the invocation raises; `crash` -> the process exits with status
  3 the first time (a marker file under `$MARKERS` remembers); `slow` ->
  sleeps 30 s the first time; anything else (and crash or slow after the
  first time) -> `text\\n` appended to `$RECEIPTS`;
- one stdout line per invocation, `handled N records`;
- `FAIL_INIT` set and non-empty -> the import fails, which the runtime
  client reports as an init error.
"""

import base64
import os
import re
import time

if os.environ.get("FAIL_INIT"):
    raise RuntimeError("init failed: FAIL_INIT=" + os.environ["FAIL_INIT"])


def handler(event, context):
    items = _items(event)
    failures = []
    for ident, text in items:
        if "poison" in text:
            failures.append({"itemIdentifier": ident})
            continue
        if "throw" in text:
            raise ValueError("throw record " + text)
        if "crash" in text and _first_time("crash", text):
            # At once, as a segfault or an OOM kill would: no reply, no flush.
            os._exit(3)
        if "slow" in text and _first_time("slow", text):
            time.sleep(30)
        _receipt(text)
    print("handled %d records" % len(items))
    return {"batchItemFailures": failures}


def _items(event):
    """The (identifier, text) pairs of whichever event this is, in order."""
    records = event.get("Records")
    if isinstance(records, list) and records:
        first = records[0]
        if "kinesis" in first:
            return [
                (r["kinesis"]["sequenceNumber"], base64.b64decode(r["kinesis"]["data"]).decode())
                for r in records
            ]
        if "body" in first:
            return [(r["messageId"], r["body"]) for r in records]
        raise ValueError("an event this function does not handle: %r" % first)
    if isinstance(records, list):
        return []
    if isinstance(event.get("records"), dict):
        items = []
        # One topic-partition per event from an event source mapping; sorted
        # so that more than one would still be handled in a fixed order.
        for key in sorted(event["records"]):
            for r in event["records"][key]:
                value = r.get("value")
                text = base64.b64decode(value).decode() if value is not None else ""
                items.append((str(r["offset"]), text))
        return items
    raise ValueError("an event this function does not handle: %r" % event)


def _first_time(kind, text):
    """Whether this is the first time `kind` meets `text`; marks it if so."""
    name = re.sub(r"[^A-Za-z0-9]", "_", text)
    marker = os.path.join(_env("MARKERS"), "%s-%s" % (kind, name))
    try:
        # Exclusive create: of two processes meeting the record at once,
        # exactly one takes the first time.
        with open(marker, "x"):
            pass
    except FileExistsError:
        return False
    return True


def _receipt(text):
    # One write on an O_APPEND descriptor, so that concurrent processes
    # appending to the same file never interleave inside a line.
    fd = os.open(_env("RECEIPTS"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)


def _env(name):
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError("environment variable %s is not set" % name)
    return value
