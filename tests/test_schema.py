"""Schemas: declared in code, checked on publish and on receipt, upcast from older versions,
listed across the mesh; and a policy rule that requires one."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from aio import eventually, run

import meshmq
from meshmq._schema import check_schema, validate

ORDER_V2 = {
    "type": "object",
    "required": ["orderId", "totalAmount", "items"],
    "additionalProperties": False,
    "properties": {
        "orderId": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
        "totalAmount": {"type": "number", "minimum": 0},
        "currency": {"type": "string", "enum": ["USD", "EUR"]},
        "items": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["sku", "quantity"],
            "properties": {"sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1}}}},
    },
}
GOOD = {"orderId": "ORD-0001", "totalAmount": 59.9, "currency": "USD", "items": [{"sku": "A", "quantity": 1}]}


@pytest.mark.parametrize(("change", "field", "rule"), [
    ({"orderId": "X-1"}, "orderId", "pattern"),
    ({"totalAmount": -1}, "totalAmount", "minimum"),
    ({"totalAmount": "9"}, "totalAmount", "type"),
    ({"currency": "GBP"}, "currency", "enum"),
    ({"items": []}, "items", "minItems"),
    ({"items": [{"sku": "A", "quantity": 0}]}, "items[0].quantity", "minimum"),
    ({"items": [{"sku": "A"}]}, "items[0].quantity", "required"),
    ({"colour": "red"}, "colour", "additionalProperties"),
])
def test_a_broken_message_names_its_field_and_rule(change: dict[str, Any], field: str, rule: str) -> None:
    validate(ORDER_V2, GOOD)
    with pytest.raises(meshmq.SchemaError) as caught:
        validate(ORDER_V2, {**GOOD, **change})
    assert (caught.value.field, caught.value.rule) == (field, rule), str(caught.value)
    with pytest.raises(meshmq.SchemaError, match="totalAmount: is required"):
        validate(ORDER_V2, {k: v for k, v in GOOD.items() if k != "totalAmount"})


def test_a_schema_with_what_meshmq_cannot_check_is_refused() -> None:
    for bad, rule in (({"type": "object", "oneOf": []}, "oneOf"), ({"type": "decimal"}, "type"),
                      ({"properties": {"a": {"pattern": "("}}}, "pattern"), ({"required": "a"}, "required")):
        with pytest.raises(meshmq.SchemaError) as caught:
            check_schema(bad)
        assert caught.value.rule == rule


def test_publish_checks_receivers_check_and_upcast(mesh: str) -> None:
    async def main() -> None:
        consumer = await meshmq.AsyncAgent("billing", mesh=mesh, durability="os").start()
        consumer.schema("OrderPlaced", 2, ORDER_V2)

        @consumer.upcast("OrderPlaced", 1, 2)
        def v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:  # v1 had 'total' and no items
            return {"orderId": data["orderId"], "totalAmount": data["total"], "items": [{"sku": "?", "quantity": 1}]}

        got: list[tuple[int, Any]] = []
        consumer.subscribe("orders.*", lambda m: got.append((m.schema_version, m.data)))
        producer = await meshmq.AsyncAgent("shop", mesh=mesh, durability="memory").start()
        producer.schema("OrderPlaced", 2, ORDER_V2)
        try:
            await producer.wait_for_subscribers("orders.placed", timeout=10)
            with pytest.raises(meshmq.SchemaError, match=r"items\[0\].quantity.*'minimum'"):
                await producer.publish("orders.placed", {**GOOD, "items": [{"sku": "A", "quantity": 0}]},
                                       type="OrderPlaced", schema_version=2)
            await producer.publish("orders.placed", GOOD, type="OrderPlaced", schema_version=2)
            await producer.publish("orders.placed", {"orderId": "ORD-0002", "total": 10}, type="OrderPlaced",
                                   schema_version=1)  # an old producer's version: upcast on arrival
            other = await meshmq.AsyncAgent("legacy", mesh=mesh, durability="memory").start()  # declares nothing
            await other.wait_for_subscribers("orders.placed", timeout=10)
            await other.publish("orders.placed", {"orderId": "bad"}, type="OrderPlaced", schema_version=2)
            await eventually(lambda: len(got) == 2 and len(consumer.dead_letters()) == 1, what="2 handled, 1 refused")
            assert got == [(2, GOOD), (2, {"orderId": "ORD-0002", "totalAmount": 10,
                                           "items": [{"sku": "?", "quantity": 1}]})]
            [letter] = consumer.dead_letters()
            assert letter.reason == "schema" and "required" in (letter.error or "")
            assert consumer.stats()["messages_upcast"] == 1 and consumer.stats()["rejected_schema"] == 1
            await other.stop()
        finally:
            await producer.stop()
            await consumer.stop()

    run(main(), timeout=60)


def test_a_policy_rule_requires_a_type_and_version_on_its_topic(mesh: str, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('version = 1\n[[rule]]\nname = "orders"\ntopic = "orders.>"\n'
                      'schema = { type = "OrderPlaced", version = 2 }\n')

    async def main() -> None:
        agent = await meshmq.AsyncAgent("shop", mesh=mesh, durability="memory", discovery=False,
                                        policy_file=policy).start()
        try:
            with pytest.raises(meshmq.SchemaError, match="requires type 'OrderPlaced' version 2"):
                await agent.publish("orders.placed", GOOD, type="OrderPlaced", schema_version=1)
            await agent.publish("orders.placed", GOOD, type="OrderPlaced", schema_version=2)
            await agent.publish("audit.x", b"no rule here")
        finally:
            await agent.stop()

    run(main())


def test_meshmq_schema_ls_lists_types_versions_and_services(mesh: str, tmp_path: Path) -> None:
    cli = importlib.import_module("test_cli")
    with meshmq.Agent("shop", mesh=mesh, durability="memory") as shop, \
            meshmq.Agent("billing", mesh=mesh, durability="memory") as billing:
        shop.schema("OrderPlaced", 2, ORDER_V2)
        billing.schema("OrderPlaced", 2, ORDER_V2)
        billing.schema("InvoiceSent", 1, {"type": "object"})
        out = subprocess.run([sys.executable, "-m", "meshmq", "schema", "ls", "--json", "--mesh", mesh,
                              "--wait", "3"], capture_output=True, text=True, timeout=60, env=cli.cli_env(tmp_path))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [  # declared in code only: none was pushed to the mesh
        {"type": "InvoiceSent", "version": 1, "services": ["billing"], "pushed": None},
        {"type": "OrderPlaced", "version": 2, "services": ["billing", "shop"], "pushed": None}]
