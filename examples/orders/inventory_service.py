"""Inventory service: reserves stock for each order (blocking Agent, handlers by type).

    python inventory_service.py

Handlers are registered per event type with ``@agent.on``; the subscription
hands every message to ``agent.dispatch``, which picks the handler by type.
Runs until Ctrl-C.
"""

import threading

import meshmq


def main() -> None:
    with meshmq.Agent("inventory-service") as agent:

        @agent.on("OrderPlaced")
        def reserve_stock(msg: meshmq.Message) -> None:
            order = msg.data
            units = sum(item["quantity"] for item in order["items"])
            print(f"reserved stock for {order['orderId']} ({units} pcs)", flush=True)

        agent.subscribe("orders.placed", agent.dispatch)
        print("inventory ready (Ctrl-C to stop)", flush=True)
        threading.Event().wait()  # handlers run on the agent's thread


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
