// Draws every <canvas data-chart="name"> from the page's #chart-data JSON.
(function () {
  "use strict";
  const source = document.getElementById("chart-data");
  if (!source || typeof Chart === "undefined") return;
  const data = JSON.parse(source.textContent);
  const colours = { available: "#8fbf7f", committed: "#e3b341",
                    redeemed: "#d2693c", released: "#9aa7b4", line: "#1f6feb" };
  const cny = { ticks: { callback: (v) => "CNY " + Number(v).toLocaleString() } };
  const builders = {
    budgets: (d) => stacked(d, ["available", "committed", "redeemed"]),
    programs: (d) => stacked(d, ["available", "committed", "redeemed", "released"]),
    regions: (d) => ({
      type: "bar",
      data: { labels: d.labels, datasets: [{ label: "utilisation %", data: d.utilisation,
              backgroundColor: d.labels.map((l) => (l === "west" ? "#6c8ebf" : "#d79b00")) }] },
      options: { scales: { y: { min: 0, max: 100 } }, animation: false },
    }),
    hourly: (d) => ({
      type: "line",
      data: { labels: d.labels, datasets: [{ label: "GPU-hours", data: d.values,
              borderColor: colours.line, fill: false, tension: 0.2 }] },
      options: { animation: false, scales: { y: { beginAtZero: true } } },
    }),
    burndown: (d) => ({
      type: "line",
      data: { labels: d.labels, datasets: ["available", "committed", "redeemed"].map((s) => ({
        label: s, data: d[s], borderColor: colours[s], backgroundColor: colours[s],
        fill: false, pointRadius: 0, stepped: true })) },
      options: { animation: false, scales: { y: Object.assign({ beginAtZero: true }, cny) } },
    }),
    balance: (d) => ({
      type: "doughnut",
      data: { labels: d.labels, datasets: [{ data: d.values,
              backgroundColor: [colours.available, colours.redeemed, colours.released] }] },
      options: { animation: false },
    }),
  };
  function stacked(d, series) {
    return {
      type: "bar",
      data: { labels: d.labels, datasets: series.map((s) => ({
        label: s, data: d[s], backgroundColor: colours[s] })) },
      options: { indexAxis: "y", animation: false,
                 // every city named, however many there are
                 scales: { x: Object.assign({ stacked: true }, cny),
                           y: { stacked: true, ticks: { autoSkip: false } } } },
    };
  }
  document.querySelectorAll("canvas[data-chart]").forEach((canvas) => {
    const name = canvas.dataset.chart;
    if (data[name] && builders[name]) {
      new Chart(canvas, builders[name](data[name]));
      canvas.dataset.drawn = "true";
    }
  });
})();
