"""Payment service: charges each order (AsyncAgent, a coroutine handler).

    python payment_service.py

The same API as the blocking Agent, for asyncio code: handlers may be
coroutines; they are awaited one message at a time, in arrival order.
Runs until Ctrl-C.
"""

import asyncio

import meshmq


async def charge(msg: meshmq.Message) -> None:
    order = msg.data
    await asyncio.sleep(0.05)  # stands in for a call to a payment gateway
    print(f"charged {order['currency']} {order['totalAmount']:.2f} "
          f"to {order['customerId']} for {order['orderId']}", flush=True)


async def main() -> None:
    async with meshmq.AsyncAgent("payment-service") as agent:
        agent.subscribe("orders.placed", charge)
        print("payment ready (Ctrl-C to stop)", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
