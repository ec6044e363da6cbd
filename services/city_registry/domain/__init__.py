"""The national registry's rules, in pure Python (no nameko, no SQLAlchemy, no I/O).

- ``state``: the read model as plain data (cities, programs, data centres);
- ``events``: federation events, how they are decoded and how each moves money;
- ``views``: the shapes the registry answers with (City, Datacenter, network
  summary, public view, national overview);
- ``usage``: metering's figures summed per data centre, region or nation;
- ``seeds``: seed files, city admission, data-centre registration;
- ``tokens``: roles, tokens, signing-key rotation;
- ``reconciliation``: drift between the read model and the cities' ledgers;
- ``recommendations``: where to run a job, priced with a voucher's terms.
"""
