"""Notification service: tells each customer (blocking Agent, iterating a subscription).

    python notification_service.py

A subscription without a handler is an iterator: the loop runs in your own
thread, one message at a time. Runs until Ctrl-C.
"""

import meshmq


def main() -> None:
    with meshmq.Agent("notification-service") as agent:
        orders = agent.subscribe("orders.placed")
        print("notification ready (Ctrl-C to stop)", flush=True)
        for msg in orders:
            order = msg.data
            print(f"emailed {order['customerId']}: order {order['orderId']} confirmed "
                  f"(message {msg.id} from {msg.source})", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
