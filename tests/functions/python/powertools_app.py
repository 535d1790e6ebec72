"""The Powertools test fixture function of the `function` handler kind (issue 16).

Partial batch responses written the way Powertools for AWS Lambda (Python)
documents them: a `BatchProcessor` and `process_partial_response`, with a
record handler that raises for a record it cannot take. Run by awslambdaric
(`python -m awslambdaric powertools_app.handler`).

`EVENT_TYPE` names the Powertools `EventType` (`KinesisDataStreams` or `SQS`,
and `Kafka`, which Powertools also takes). Per record: text containing
`poison` -> the handler raises, so Powertools names the record in
`batchItemFailures`; anything else -> `text\\n` appended to `$RECEIPTS`.
As Powertools does, a batch whose every record failed raises
`BatchProcessingError` instead (an invocation error).
"""

import os

from aws_lambda_powertools.utilities.batch import (
    BatchProcessor,
    EventType,
    process_partial_response,
)
from aws_lambda_powertools.utilities.data_classes.kafka_event import KafkaEventRecord
from aws_lambda_powertools.utilities.data_classes.kinesis_stream_event import KinesisStreamRecord

processor = BatchProcessor(event_type=EventType[os.environ["EVENT_TYPE"]])


def record_handler(record):
    if isinstance(record, KinesisStreamRecord):
        text = record.kinesis.data_as_text()
    elif isinstance(record, KafkaEventRecord):
        text = record.decoded_value.decode()
    else:
        text = record.body
    if "poison" in text:
        raise ValueError("poison record " + text)
    with open(os.environ["RECEIPTS"], "a") as receipts:
        receipts.write(text + "\n")


def handler(event, context):
    return process_partial_response(
        event=event, record_handler=record_handler, processor=processor, context=context
    )
