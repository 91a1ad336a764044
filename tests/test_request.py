"""Request/reply between agents on loopback: answers, errors, no responders, timeouts."""

from __future__ import annotations

import asyncio
import threading

import pytest
from aio import agents, eventually, run

import meshmq

pytestmark = pytest.mark.integration


def test_request_gets_the_reply_from_plain_and_coroutine_handlers(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "client", "prices", "stock") as (client, prices, stock):
            prices.subscribe("price.get", lambda m: m.reply({"sku": m.data["sku"], "price": 9.5}))

            @stock.subscribe("stock.get")
            async def on_stock(msg: meshmq.Message) -> None:
                await asyncio.sleep(0)
                msg.reply(7, type="StockLevel", headers={"unit": "pcs"})

            await client.wait_for_subscribers("price.get", timeout=10)
            await client.wait_for_subscribers("stock.get", timeout=10)
            price = await client.request("price.get", {"sku": "P-1"}, timeout=5)
            level = await client.request("stock.get", {"sku": "P-1"}, timeout=5)
            assert price.data == {"sku": "P-1", "price": 9.5} and price.source == "prices"
            assert level.data == 7 and level.type == "StockLevel" and level.headers["unit"] == "pcs"

    run(main())


def test_no_responders_is_raised_at_once_not_after_the_timeout(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "client") as (client,):
            # The outer bound (2 s) is far below the request's own timeout (60 s).
            with pytest.raises(meshmq.NoResponders) as info:
                await asyncio.wait_for(client.request("nobody.home", 1, timeout=60), 2)
            assert info.value.topic == "nobody.home"

    run(main())


def test_request_times_out_when_nobody_answers(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "client", "silent") as (client, silent):
            silent.subscribe("silent.q", lambda m: None)
            await client.wait_for_subscribers("silent.q", timeout=10)
            with pytest.raises(meshmq.RequestTimeout) as info:
                await client.request("silent.q", 1, timeout=0.3)
            assert info.value.topic == "silent.q" and info.value.timeout == 0.3
            assert client.stats()["requests_timed_out"] == 1

    run(main())


def test_a_failing_handler_sends_an_error_the_requester_sees(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "client", "orders") as (client, orders):
            def place(msg: meshmq.Message) -> None:
                raise ValueError("totalAmount must be positive")

            orders.subscribe("orders.place", place)
            await client.wait_for_subscribers("orders.place", timeout=10)
            with pytest.raises(meshmq.RemoteError) as info:
                await client.request("orders.place", {"totalAmount": -1}, timeout=5)
            err = info.value
            assert err.service == "orders" and err.node == orders.node_id
            assert "ValueError: totalAmount must be positive" in str(err)

    run(main())


def test_queue_group_answers_each_request_exactly_once(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "client", "w1", "w2", "w3") as (client, *workers):
            for w in workers:
                w.subscribe("work.do", lambda m, name=w.service: m.reply(name), queue="workers")
            while len(client._index.resolve("work.do").groups[0].members if client._index.resolve(
                    "work.do").groups else ()) < 3:
                await client._routes_changed(1)
            answers = [(await client.request("work.do", i, timeout=5)).data for i in range(30)]
            assert sorted(set(answers)) == ["w1", "w2", "w3"]
            assert sum(w.stats().get("replies_sent", 0) for w in workers) == 30
            assert client.stats().get("replies_late", 0) == 0

    run(main())


def test_first_of_several_plain_responders_wins(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "client", "a", "b") as (client, a, b):
            a.subscribe("ask", lambda m: m.reply("a"))
            b.subscribe("ask", lambda m: m.reply("b"))
            await client.wait_for_subscribers("ask", count=2, timeout=10)
            reply = await client.request("ask", 1, timeout=5)
            assert reply.data in ("a", "b")
            # The second answer arrives and is counted as late.
            await eventually(lambda: client.stats().get("replies_late", 0) == 1, what="the late reply counted")
            assert client.stats().get("replies_late", 0) == 1

    run(main())


def test_no_responders_when_the_only_responder_leaves_mid_request(mesh: str) -> None:
    async def main() -> None:
        async with agents(mesh, "client") as (client,):
            responder = await meshmq.AsyncAgent("flaky", mesh=mesh).start()
            got = asyncio.Event()
            responder.subscribe("slow.q", lambda m: got.set())
            await client.wait_for_subscribers("slow.q", timeout=10)
            pending = asyncio.ensure_future(client.request("slow.q", 1, timeout=60))
            await asyncio.wait_for(got.wait(), 5)
            await responder.stop()  # BYE: the client knows nobody is left to answer
            with pytest.raises(meshmq.NoResponders):
                await asyncio.wait_for(pending, 5)

    run(main())


def test_local_responder_and_blocking_faces(mesh: str) -> None:
    with meshmq.Agent("both", mesh=mesh) as agent:
        agent.subscribe("echo.local", lambda m: m.reply(m.data * 2))
        assert agent.request("echo.local", 21, timeout=5).data == 42  # answered by itself

        with meshmq.Agent("client", mesh=mesh) as client:
            sub = agent.subscribe("echo.thread")

            def serve() -> None:  # a consumer thread iterating and replying
                msg = sub.get(timeout=10)
                assert msg is not None and msg.is_request
                msg.reply(msg.data.upper())

            worker = threading.Thread(target=serve)
            worker.start()
            client.wait_for_subscribers("echo.thread", timeout=10)
            assert client.request("echo.thread", "hi", timeout=5).data == "HI"
            worker.join(timeout=10)


def test_reply_misuse_and_reserved_topics(mesh: str) -> None:
    with meshmq.Agent("misuse", mesh=mesh) as agent:
        sub = agent.subscribe("plain.x")
        agent.publish("plain.x", 1)
        msg = sub.get(timeout=5)
        assert msg is not None and not msg.is_request
        with pytest.raises(meshmq.UsageError, match="not a request"):
            msg.reply(2)
        with pytest.raises(meshmq.TopicError, match="reserved"):
            agent.publish("_reply.someone", 1)
        with pytest.raises(meshmq.TopicError, match="reserved"):
            agent.subscribe("_reply.>")
        with pytest.raises(meshmq.UsageError, match="timeout"):
            agent.request("plain.x", 1, timeout=0)
