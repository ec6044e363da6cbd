"""One city's voucher service (``vouchers_<city>``): rules, vouchers, ledger."""
