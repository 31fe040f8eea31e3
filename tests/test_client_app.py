"""The ClientApp's handlers, called directly: describe, train and evaluate on a node's own partition."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from client_app.app import app as client_app
from fedprune.experiment import experiment_from_run_config
from fedprune.task import new_model
from fedprune.protocol import expected_of, unpack
from tests.conftest import make_context


def instruction(run_config, message_type, server_round=1):
    model = new_model(experiment_from_run_config(run_config))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "config": ConfigRecord({"server-round": server_round})})
    return Message(content, dst_node_id=101, message_type=message_type), model


def test_describe_reports_partition_and_sizes(tiny_run_config):
    msg = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=101, message_type="query.describe")
    m = client_app(msg, make_context(tiny_run_config, 1, 3)).content["metrics"]
    assert m["partition-id"] == 1 and m["num-partitions"] == 3 and m["num-train"] + m["num-val"] == 200
    assert m["num-val"] == 20


def test_train_returns_updated_weights_of_the_same_shape_and_is_repeatable(tiny_run_config):
    msg, model = instruction(tiny_run_config, MessageType.TRAIN)
    ctx = make_context(tiny_run_config, 0, 3)
    first, second = client_app(msg, ctx).content, client_app(msg, ctx).content
    before = {k: v.numpy() for k, v in model.state_dict().items()}
    after = unpack(first["arrays"], expected_of(before))
    assert after.keys() == before.keys()
    assert all(after[k].shape == before[k].shape and after[k].dtype == before[k].dtype for k in before)
    assert any(not np.array_equal(after[k], before[k]) for k in before)
    for k, v in unpack(second["arrays"], expected_of(before)).items():
        np.testing.assert_array_equal(v, after[k])
    metrics = first["metrics"]
    assert metrics["num-examples"] == 180 and np.isfinite(metrics["loss"]) and metrics["partition-id"] == 0


def test_train_depends_on_round(tiny_run_config):
    ctx = make_context(tiny_run_config, 0, 3)
    a = client_app(instruction(tiny_run_config, MessageType.TRAIN, 1)[0], ctx).content["arrays"]
    b = client_app(instruction(tiny_run_config, MessageType.TRAIN, 2)[0], ctx).content["arrays"]
    expected = expected_of({k: v.numpy() for k, v in new_model(experiment_from_run_config(tiny_run_config)).state_dict().items()})
    a, b = unpack(a, expected), unpack(b, expected)
    assert any(not np.array_equal(a[k], b[k]) for k in a)


def test_evaluate_reports_loss_and_accuracy_on_the_validation_split(tiny_run_config):
    msg, _ = instruction(tiny_run_config, MessageType.EVALUATE)
    m = client_app(msg, make_context(tiny_run_config, 2, 3)).content["metrics"]
    assert m["num-examples"] == 20 and 0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0


def test_node_without_partition_config_gets_a_clear_error(tiny_run_config):
    msg, _ = instruction(tiny_run_config, MessageType.TRAIN)
    ctx = make_context(tiny_run_config, 0, 3)
    ctx.node_config.clear()
    with pytest.raises(ValueError, match="partition-id and num-partitions"):
        client_app(msg, ctx)
