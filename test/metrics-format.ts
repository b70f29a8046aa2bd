/**
 * Reading the metrics files back in tests: every line checked against the Prometheus text exposition
 * format (HELP, then TYPE gauge, then the family's samples; families sorted), samples returned by
 * series ("name{labels}") with their values.
 */
import assert from 'node:assert/strict';
import * as fsp from 'node:fs/promises';

/** One sample line of the text exposition format (name, optional labels, value; no timestamp). */
export const SAMPLE = /^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*"(,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*")*\})? (?:[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|NaN|[+-]Inf)$/;

/** Parses a metrics file line by line, checking its shape: series → value. */
export function parseMetrics(text: string): Map<string, number> {
  assert.ok(text.endsWith('\n'), 'ends with a line feed');
  const out = new Map<string, number>();
  let family = '';
  let typed = false;
  for (const line of text.slice(0, -1).split('\n')) {
    const help = /^# HELP ([a-z_]+) \S.*$/.exec(line);
    const type = /^# TYPE ([a-z_]+) gauge$/.exec(line);
    if (help) {
      assert.ok(help[1]! > family, `families sorted: ${help[1]} after ${family}`);
      family = help[1]!;
      typed = false;
    } else if (type) {
      assert.equal(type[1], family, 'TYPE follows its HELP');
      typed = true;
    } else {
      assert.match(line, SAMPLE);
      assert.ok(typed && (line.startsWith(`${family}{`) || line.startsWith(`${family} `)), `${line} in family ${family}`);
      const at = line.lastIndexOf(' ');
      out.set(line.slice(0, at), Number(line.slice(at + 1)));
    }
  }
  return out;
}

/** parseMetrics of a file, as a plain object. */
export async function readMetrics(file: string): Promise<Record<string, number>> {
  return Object.fromEntries(parseMetrics(await fsp.readFile(file, 'utf8')));
}
