"""Order service: places orders on 'orders.placed' (blocking Agent).

    python order_service.py [COUNT]

It waits until the inventory, payment and notification services subscribe,
then places COUNT orders (default 5), one every half second. It declares the
OrderPlaced schema (order_placed.v1.json: a malformed order raises SchemaError
before it leaves) and enforces policy.toml: a rate limit, and orders over 300
routed to 'orders.review' too (review_service.py shows them).
"""

import json
import random
import sys
import time
from pathlib import Path

import meshmq

HERE = Path(__file__).resolve().parent

PRODUCTS = [("SKU-KEYBOARD", 49.99), ("SKU-MOUSE", 19.99), ("SKU-MONITOR", 189.00), ("SKU-CABLE", 9.99)]


def make_order(number: int) -> dict:
    rng = random.Random(number)  # the same orders every run: easy to follow, and to test
    items: list[dict] = [{"productId": sku, "quantity": rng.randint(1, 3), "price": price}
                         for sku, price in rng.sample(PRODUCTS, rng.randint(1, 3))]
    return {
        "orderId": f"ORD-{number:04d}",
        "customerId": f"CUST-{rng.randint(1, 42):03d}",
        "items": items,
        "totalAmount": round(sum(i["quantity"] * i["price"] for i in items), 2),
        "currency": "USD",
    }


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with meshmq.Agent("order-service", policy_file=HERE / "policy.toml") as agent:
        agent.schema("OrderPlaced", 1, json.loads((HERE / "order_placed.v1.json").read_text()))
        print("waiting for inventory, payment and notification to subscribe...")
        agent.wait_for_subscribers("orders.placed", count=3, timeout=60)
        for number in range(1, count + 1):
            order = make_order(number)
            agent.publish("orders.placed", order, type="OrderPlaced", key=order["customerId"])
            print(f"placed {order['orderId']}: {order['currency']} {order['totalAmount']:.2f}", flush=True)
            time.sleep(0.5)  # only to make the flow easy to follow


if __name__ == "__main__":
    main()
