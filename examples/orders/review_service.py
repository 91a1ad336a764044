"""Review service: looks at big orders (blocking Agent, a plain handler).

    python review_service.py

Nothing publishes on 'orders.review' directly: the order service's policy
(policy.toml) routes every order over 300 there too, by its content. Runs until Ctrl-C.
"""

import threading

import meshmq


def main() -> None:
    with meshmq.Agent("review-service") as agent:
        def review(msg: meshmq.Message) -> None:
            order = msg.data
            print(f"review {order['orderId']}: {order['currency']} {order['totalAmount']:.2f} "
                  f"from {order['customerId']}", flush=True)

        agent.subscribe("orders.review", review)
        print("review ready (Ctrl-C to stop)", flush=True)
        threading.Event().wait()  # until Ctrl-C


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        pass
