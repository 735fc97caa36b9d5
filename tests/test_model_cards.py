"""/v1/models serves each model's card as its replicas report it (vLLM: max_model_len, root, parent,
permission), and the configured id before any replica has answered."""

from __future__ import annotations

from tests.conftest import MODEL, Cluster, openai_client, wait_for


async def test_card_from_the_replica_then_fallback(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r], health={"interval": "100ms", "timeout": "200ms", "rise": 1, "slow_start": 0})
    rep = p.table[MODEL].replicas[0]
    await wait_for(lambda: MODEL in rep.cards, 5)  # the first health check fetched it (up was assumed)
    async with openai_client(p) as client:
        for card in ((await client.models.list()).data[0], await client.models.retrieve(MODEL)):
            d = card.model_dump()
            assert d["id"] == MODEL and d["max_model_len"] == 32768 and d["root"] == MODEL
            assert d["owned_by"] == "vllm" and "parent" in d and d["parent"] is None


async def test_configured_id_when_no_replica_answered(cluster: Cluster) -> None:
    r = await cluster.replica()
    p = await cluster.proxy([r])  # health checks off: nobody asked the replica for its card
    async with openai_client(p) as client:
        d = (await client.models.retrieve(MODEL)).model_dump()
    assert d["id"] == MODEL and d["owned_by"] == "teraproxy" and "max_model_len" not in d
