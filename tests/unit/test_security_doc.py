"""docs/security.md's permission tables are the code's (deploy/security_tables.py)."""

from deploy import security_tables


def test_the_documented_tables_are_what_the_code_enforces():
    documented = security_tables.document_tables(security_tables.DOC.read_text())
    assert documented == security_tables.tables(), (
        "docs/security.md is stale: run python -m deploy.security_tables --write"
    )


def test_every_rpc_method_and_member_kind_is_in_the_tables():
    text = security_tables.tables()
    for service, methods in security_tables.RPC_CALLERS.items():
        for method in methods:
            assert f"`{method}`" in text, (service, method)
    assert "`city.<code>`" in text and "`dc.<id>`" in text
