/* The console's live parts: redraw the charts (uPlot, vendored) and poll the page for a fresh #live. */
(function () {
  "use strict";
  var charts = [];

  function unitOf(spec) {
    return function (u, v) { return v == null ? "—" : v.toFixed(1) + " " + spec.unit; };
  }

  function drawCharts(root) {
    charts.splice(0).forEach(function (c) { c.destroy(); });
    root.querySelectorAll("[data-chart]").forEach(function (el) {
      var source = document.getElementById(el.dataset.chart);
      if (!source) { return; }
      var spec = JSON.parse(source.textContent);
      el.textContent = "";
      if (!spec.data.t.length) {
        el.innerHTML = '<p class="muted">' + spec.empty + "</p>";
        return;
      }
      var data = [spec.data.t].concat(spec.series.map(function (s) { return spec.data[s.key]; }));
      var opts = {
        width: Math.max(320, el.clientWidth || 640),
        height: 220,
        scales: { x: { time: true } },
        series: [{}].concat(spec.series.map(function (s) {
          return { label: s.label, stroke: s.stroke, width: 2, dash: s.dash, value: unitOf(spec),
                   points: { show: true, size: 5, fill: s.stroke } };
        })),
        axes: [{}, { size: 70, values: function (u, vals) { return vals.map(function (v) { return v + " " + spec.unit; }); } }],
      };
      charts.push(new uPlot(opts, data, el));
    });
  }

  function refresh(live) {
    fetch(location.href, { credentials: "same-origin", headers: { "X-Requested-With": "fetch" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("live");
        if (fresh) { live.innerHTML = fresh.innerHTML; drawCharts(live); }
        // The action buttons only when what the state allows changed, so a reason being typed stays.
        var actions = document.getElementById("actions"), freshActions = doc.getElementById("actions");
        if (actions && freshActions && actions.dataset.key !== freshActions.dataset.key) {
          actions.innerHTML = freshActions.innerHTML;
          actions.dataset.key = freshActions.dataset.key;
        }
        var stamp = document.getElementById("refreshed");
        if (stamp) { stamp.textContent = "updated " + new Date().toLocaleTimeString(); stamp.classList.remove("stale"); }
      })
      .catch(function () {
        var stamp = document.getElementById("refreshed");
        if (stamp) { stamp.textContent = "could not refresh; retrying"; stamp.classList.add("stale"); }
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    drawCharts(document);
    var live = document.getElementById("live");
    if (live && live.dataset.refresh) {
      setInterval(function () { refresh(live); }, 1000 * Number(live.dataset.refresh));
    }
  });
})();
