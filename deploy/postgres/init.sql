-- One database per service and per city (DESIGN.md §3: every service owns
-- its data). Run once by the postgres container on first start.
CREATE DATABASE city_registry;
CREATE DATABASE metering;
CREATE DATABASE vouchers_shanghai;
CREATE DATABASE vouchers_chengdu;
CREATE DATABASE vouchers_shandong;
CREATE DATABASE datacenter_gateway_guian;
CREATE DATABASE datacenter_gateway_lingang;
CREATE DATABASE portal;
