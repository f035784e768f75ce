/**
 * A validated fleet as the code sees it (config/fleet.ts), built in memory for tests of the pure
 * parts (expiry, lines, status): one bastion `eu`, default ranges, no file read.
 */
import type { Bastion, Fleet } from "../../src/config/fleet.js";

/** A pinned bastion host key (the key of a throwaway pair; nothing connects to it). */
export const PIN = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEC06vAZeDFFKzcpTx7u6nyv/CTDxHp9/HINRB55mZJB bastion";

/** Bastion `eu` with sshd's port and no options, then `over`. */
export function bastionRecord(over: Partial<Bastion> = {}): Bastion {
  return { name: "eu", host: "bastion-eu.example.com", port: 22, user: "reverse-ssh", hostKeys: [PIN], from: undefined, expiry: undefined, jumpUser: undefined, ...over };
}

/** A fleet of that one bastion, ports 21000-21999 and 22000-22999. */
export function fleetRecord(b: Bastion): Fleet {
  return {
    file: "fleet.yaml",
    registry: "/dev/null",
    hostnameTemplate: "gw-{seq:04}",
    ports: { ssh: { lo: 21000, hi: 21999 }, services: { lo: 22000, hi: 22999 } },
    bastions: new Map([["eu", b]]),
    forwards: [],
    operators: undefined,
  };
}
