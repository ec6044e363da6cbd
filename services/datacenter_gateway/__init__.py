"""datacenter_gateway: the edge process one data centre runs (DESIGN.md §3).

Agents POST usage to its HTTP API (``app``); records are stored durably in the
``outbox`` before they are acknowledged; the ``relay`` publishes them signed to
``computenet.usage`` with publisher confirms, owning its retry loop; the
``capacity`` reporter says how many GPUs are installed and busy. Not a nameko
service: a plain process (``__main__``), with ``simulate`` as a stand-in agent.
"""

SERVICE_NAME = "datacenter_gateway"
