"""Sums the `amount` field of JSON records, per batch.

An ordinary AWS Lambda function for Kinesis and SQS events, run unchanged by
shardline's `function` handler (see ../README.md): the worker hands it each
batch of a Kafka topic as a Kinesis event and each batch of a RabbitMQ
subscription as an SQS event. A record that is not a JSON object with a
numeric (or no) `amount` is named in `batchItemFailures`, so only it is
retried and, at last, given up on; the rest of the batch counts.
"""

import base64
import json
import logging

logger = logging.getLogger()
logger.setLevel(logging.INFO)


def handler(event, context):
    total = 0
    failures = []
    for record in event["Records"]:
        if "kinesis" in record:
            ident = record["kinesis"]["sequenceNumber"]
            body = base64.b64decode(record["kinesis"]["data"])
        else:
            ident = record["messageId"]
            body = record["body"]
        try:
            total += amount(body)
        except ValueError as e:
            logger.warning("record %s skipped: %s", ident, e)
            failures.append({"itemIdentifier": ident})
    logger.info(
        "%s: %d records, total %s, %d failed",
        context.function_name,
        len(event["Records"]),
        total,
        len(failures),
    )
    return {"batchItemFailures": failures}


def amount(body):
    try:
        value = json.loads(body)
    except ValueError:
        raise ValueError("not JSON: %.60r" % body) from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    number = value.get("amount", 0)
    # bool is an int in Python, but `"amount": true` is no amount.
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ValueError("amount is not a number: %r" % (number,))
    return number
